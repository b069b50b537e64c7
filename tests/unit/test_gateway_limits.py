"""Token buckets, the daily quota, pre-signed URLs, params validation (no services)."""

from __future__ import annotations

import asyncio
import datetime as dt
import urllib.parse

import pytest

from gateway.inputs import object_key, page_token, parse_page_token, parse_params
from gateway.limits import DailyQuota, TokenBuckets, seconds_to_midnight, utc_day
from gateway.presign import presign_put
from gateway.problems import CODES, Problem
from infra.settings import GatewaySettings


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=2.0, burst=3, clock=clock)
    assert [buckets.take("a").allowed for _ in range(4)] == [True, True, True, False]
    denied = buckets.take("a")
    assert denied.retry_after_s == 1 and denied.remaining == 0
    assert denied.headers() == {"RateLimit-Limit": "3", "RateLimit-Remaining": "0", "RateLimit-Reset": "2"}
    assert buckets.take("b").allowed  # tenants have their own buckets
    clock.t += 0.5
    assert buckets.take("a").allowed and not buckets.take("a").allowed
    with pytest.raises(Problem) as info:
        buckets.check("a")
    assert info.value.status == 429 and info.value.headers["Retry-After"] == "1"


def test_daily_quota_refuses_past_the_limit_until_midnight() -> None:
    used: dict[tuple[str, str], int] = {}

    async def read(t: str, d: str) -> int:
        return used.get((t, d), 0)

    async def add(t: str, d: str, n: int) -> None:
        used[(t, d)] = used.get((t, d), 0) + n

    now = dt.datetime(2026, 3, 1, 23, 59, 0, tzinfo=dt.UTC).timestamp()
    quota = DailyQuota(5, read, add, clock=lambda: now)
    assert asyncio.run(quota.charge("a", 3)) == 2
    assert asyncio.run(quota.charge("a", 2)) == 0
    with pytest.raises(Problem) as info:
        asyncio.run(quota.charge("a", 1))
    assert info.value.code == "QUOTA_EXCEEDED" and info.value.headers["Retry-After"] == "60"
    assert used == {("a", "2026-03-01"): 5}
    assert utc_day(now) == "2026-03-01" and seconds_to_midnight(now) == 60


def test_presigned_put_signs_length_type_and_marker() -> None:
    url = presign_put(endpoint="127.0.0.1:9000", secure=True, region="us-east-1", access_key="AK", secret_key="SK",  # noqa: S106
                      bucket="uploads", key="t1/uploads/abc", expires_s=900,
                      headers={"Content-Type": "image/jpeg", "Content-Length": "10",
                               "x-amz-meta-detectflow-submitted": "true"},
                      now=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC))
    parts = urllib.parse.urlsplit(url)
    q = dict(urllib.parse.parse_qsl(parts.query))
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "127.0.0.1:9000", "/uploads/t1/uploads/abc")
    assert q["X-Amz-SignedHeaders"] == "content-length;content-type;host;x-amz-meta-detectflow-submitted"
    assert q["X-Amz-Credential"] == "AK/20260102/us-east-1/s3/aws4_request" and q["X-Amz-Expires"] == "900"
    assert len(q["X-Amz-Signature"]) == 64
    with pytest.raises(ValueError):
        presign_put(endpoint="h", secure=True, region="r", access_key="a", secret_key="s", bucket="b", key="k",  # noqa: S106
                    expires_s=0, headers={}, now=dt.datetime.now(dt.UTC))


def test_params_validation() -> None:
    settings = GatewaySettings.from_env({})
    names = ("person", "bus")
    p = parse_params({"score_threshold": "0.5", "max_detections": "7", "classes": "person, bus"}, settings, names)
    assert (p.score_threshold, p.max_detections, p.classes, p.model) == (0.5, 7, ("bus", "person"), "yolov4-tiny")
    bad = [{"score_threshold": "nan"}, {"score_threshold": "0"}, {"max_detections": "1.5"},
           {"max_detections": 301}, {"classes": "cat"}, {"classes": [1]}, {"model": "../x"},
           {"model_version": "0"}, {"max_detections": True}]
    for raw in bad:
        with pytest.raises(Problem) as info:
            parse_params(raw, settings, names)
        assert info.value.code == "INVALID_PARAMS", raw


def test_object_references_stay_in_the_tenants_prefix() -> None:
    assert object_key("t1", {"upload_id": "0" * 32}) == f"t1/uploads/{'0' * 32}"
    assert object_key("t1", {"key": "t1/a/b.jpg"}) == "t1/a/b.jpg"
    for ref, code in [({"key": "t2/x.jpg"}, "NOT_FOUND"), ({"key": "t1/../t2/x"}, "INVALID_REQUEST"),
                      ({"upload_id": "x"}, "INVALID_REQUEST"), ("t1/x", "INVALID_REQUEST")]:
        with pytest.raises(Problem) as info:
            object_key("t1", ref)
        assert info.value.code == code, ref


def test_page_tokens_round_trip_and_refuse_garbage() -> None:
    rid = "0b8f6f0e-3f5c-4a8e-9d6e-51a4c0d7e2b9"
    assert parse_page_token(page_token(rid)) == rid
    for bad in ("%%%", page_token("a b"), "////"):
        with pytest.raises(Problem):
            parse_page_token(bad)


def test_problem_body_is_rfc9457() -> None:
    p = Problem("IMAGE_REJECTED", "too big", image_code="IMAGE_TOO_LARGE")
    body = p.body("/v1/detect")
    assert body == {"type": "https://detectflow.dev/problems/image-rejected", "title": CODES["IMAGE_REJECTED"][1],
                    "status": 422, "code": "IMAGE_REJECTED", "detail": "too big", "instance": "/v1/detect",
                    "image_code": "IMAGE_TOO_LARGE"}
    assert p.response().content_type == "application/problem+json"
    with pytest.raises(ValueError):
        Problem("NO_SUCH_CODE")


def test_daily_quota_reads_the_shared_counter_once_per_interval_and_refuses_only_on_a_fresh_read() -> None:
    used = {"n": 0}
    reads: list[int] = []
    mono = {"t": 0.0}

    async def read(t: str, d: str) -> int:
        reads.append(used["n"])
        return used["n"]

    async def add(t: str, d: str, n: int) -> None:
        used["n"] += n

    quota = DailyQuota(5, read, add, read_cache_s=1.0, monotonic=lambda: mono["t"])
    for _ in range(3):
        asyncio.run(quota.charge("a", 1))
    assert len(reads) == 1 and used["n"] == 3  # one read, three charges
    used["n"] += 1  # another gateway instance charged one meanwhile: this one does not know yet
    asyncio.run(quota.charge("a", 1))
    asyncio.run(quota.charge("a", 1))  # its estimate (5) fits: admitted, one past the limit (the documented bound)
    assert len(reads) == 1 and used["n"] == 6
    with pytest.raises(Problem):
        asyncio.run(quota.charge("a", 1))  # the estimate says it does not fit: a fresh read decides
    assert reads[-1] == 6 and len(reads) == 2
    mono["t"] = 2.0
    used["n"] = 0  # (a new counter, say): past the interval the counter is read again
    asyncio.run(quota.charge("a", 1))
    assert len(reads) == 3 and used["n"] == 1

"""Token buckets, the daily quota, pre-signed URLs, params validation (no services)."""

from __future__ import annotations

import asyncio
import datetime as dt
import urllib.parse

import pytest

from config import GatewaySettings
from gateway.inputs import object_key, page_token, parse_page_token, parse_params
from gateway.limits import DailyQuota, TokenBuckets, seconds_to_midnight, utc_day
from gateway.presign import presign_put
from gateway.problems import CODES, Problem


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


class QuotaRow:
    """The quota table as the store's compare-and-set sees it: one value per (tenant, day), None before the first
    charge. ``race`` charges that land between this instance's read and its compare-and-set (other instances)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], int] = {}
        self.reads = 0
        self.cas_calls = 0
        self.race: list[int] = []

    async def read(self, t: str, d: str) -> int | None:
        self.reads += 1
        return self.rows.get((t, d))

    async def cas(self, t: str, d: str, expected: int | None, new: int) -> tuple[bool, int | None]:
        self.cas_calls += 1
        if self.race:
            self.rows[(t, d)] = self.rows.get((t, d), 0) + self.race.pop(0)
        await asyncio.sleep(0)  # let concurrent charges interleave, as awaiting the store does
        current = self.rows.get((t, d))
        if current != expected:
            return False, current
        self.rows[(t, d)] = new
        return True, new


def test_daily_quota_refuses_past_the_limit_until_midnight() -> None:
    row = QuotaRow()
    now = dt.datetime(2026, 3, 1, 23, 59, 0, tzinfo=dt.UTC).timestamp()
    quota = DailyQuota(5, row.read, row.cas, clock=lambda: now)
    assert asyncio.run(quota.charge("a", 3)) == 2
    assert asyncio.run(quota.charge("a", 2)) == 0
    with pytest.raises(Problem) as info:
        asyncio.run(quota.charge("a", 1))
    assert info.value.code == "QUOTA_EXCEEDED" and info.value.headers["Retry-After"] == "60"
    assert row.rows == {("a", "2026-03-01"): 5}
    assert utc_day(now) == "2026-03-01" and seconds_to_midnight(now) == 60


def test_concurrent_charges_never_pass_the_quota() -> None:
    """50 concurrent charges of 3 under a quota of 20 (the race check-then-add lost): 6 admitted, 18 charged."""
    row = QuotaRow()
    quota = DailyQuota(20, row.read, row.cas, read_cache_s=0.0)

    async def all_of() -> list[object]:
        return await asyncio.gather(*(quota.charge("a", 3) for _ in range(50)), return_exceptions=True)

    outcomes = asyncio.run(all_of())
    admitted = [o for o in outcomes if isinstance(o, int)]
    refused = [o for o in outcomes if isinstance(o, Problem)]
    assert len(admitted) == 6 and len(refused) == 44
    assert all(p.code == "QUOTA_EXCEEDED" for p in refused)
    assert sum(row.rows.values()) == 18


def test_two_instances_racing_on_one_row_never_pass_the_quota() -> None:
    """Two DailyQuota objects (two gateway instances) share the row; each loses races to the other."""
    row = QuotaRow()
    one, two = (DailyQuota(30, row.read, row.cas, read_cache_s=10.0) for _ in range(2))

    async def all_of() -> list[object]:
        calls = [q.charge("a", 2) for _ in range(25) for q in (one, two)]
        return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(all_of())
    admitted = [o for o in outcomes if isinstance(o, int)]
    assert len(admitted) == 15 and sum(row.rows.values()) == 30
    assert all(isinstance(o, Problem) and o.code in ("QUOTA_EXCEEDED", "OVERLOADED") for o in outcomes
               if not isinstance(o, int))


def test_a_lost_race_retries_with_the_value_that_won_and_gives_up_bounded() -> None:
    row = QuotaRow()
    row.race = [1, 1]  # two other charges land first
    quota = DailyQuota(10, row.read, row.cas, backoff_s=0.0)
    assert asyncio.run(quota.charge("a", 1)) == 7  # 1 + 1 by the others, then ours
    assert row.cas_calls == 3 and row.reads == 1  # no read after a lost race: the answer carries the value
    row.race = [1] * 20  # the row changes under every attempt
    busy = DailyQuota(1000, row.read, row.cas, max_attempts=4, backoff_s=0.0)
    with pytest.raises(Problem) as info:
        asyncio.run(busy.charge("a", 1))
    assert info.value.code == "OVERLOADED" and info.value.status == 503 and info.value.headers["Retry-After"] == "1"


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


def test_daily_quota_uses_the_value_it_saw_and_refuses_only_on_a_fresh_one() -> None:
    row = QuotaRow()
    mono = {"t": 0.0}
    quota = DailyQuota(5, row.read, row.cas, read_cache_s=1.0, monotonic=lambda: mono["t"])
    for _ in range(3):
        asyncio.run(quota.charge("a", 1))
    assert row.reads == 1 and row.rows[("a", utc_day())] == 3  # one read, three compare-and-sets
    row.rows[("a", utc_day())] += 2  # another gateway instance charged two meanwhile: this one does not know
    with pytest.raises(Problem):
        asyncio.run(quota.charge("a", 1))  # its expectation (3) loses the race; the winner's value (5) refuses
    assert row.rows[("a", utc_day())] == 5 and row.reads == 1
    row.rows[("a", utc_day())] = 0  # (erased, say): the stale value (5) refuses nothing before a fresh read
    assert asyncio.run(quota.charge("a", 1)) == 4
    assert row.reads == 2


def test_token_buckets_divide_the_rate_among_live_instances() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=10.0, burst=9, clock=clock)
    buckets.set_instances(3)
    assert (buckets.rate, buckets.burst) == (10.0 / 3, 3)
    assert [buckets.take("a").allowed for _ in range(4)] == [True, True, True, False]
    clock.t += 0.31  # 10/3 per second: one token back after 0.3 s
    assert buckets.take("a").allowed and not buckets.take("a").allowed
    buckets.set_instances(0)  # never below one instance
    assert (buckets.rate, buckets.burst) == (10.0, 9)
    one = TokenBuckets(rate=1.0, burst=1, clock=clock)
    one.check("c")
    with pytest.raises(Problem) as info:
        one.check("c")
    assert info.value.code == "RATE_LIMITED" and info.value.headers["Retry-After"] == "1"

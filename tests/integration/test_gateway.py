"""The HTTP gateway against the real stack and pipeline: sync/async detect, auth, tenancy, validation,
idempotency, uploads, jobs, deletion, audit, operations endpoints."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import jwt
import numpy as np
import pytest
import requests
import schemathesis
from gateway_kit import Gateway, start_stack_with_gateway
from hypothesis import HealthCheck, given, settings
from imaging_fixtures import minimal_pdf, png_header_bomb
from object_kit import root_minio
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from stream_kit import read_all

from config import StackSettings
from infra.jobs_cmd import JobsClient
from model_store.detect import Detector
from processors.imaging import ImageLimits, prepare
from stream.serde import AvroSerde

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def gw(stack: StackSettings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    prefix = f"gw{uuid.uuid4().hex[:6]}."
    yield from start_stack_with_gateway(stack, prefix, tmp_path_factory.mktemp("gateway-logs"))


@pytest.fixture(scope="module")
def reference() -> Detector:
    from model_store.convert import default_out_dir

    return Detector.from_model_dir(default_out_dir(), conf_threshold=0.25, iou_threshold=0.45, max_detections=100)


def tenant() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def variants(data: bytes, n: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct JPEGs of the same picture (one pixel differs), so no two share a cache entry."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    out = []
    for i in range(n):
        copy = image.copy()
        copy[(i + seed) // image.shape[1] % image.shape[0], (i + seed) % image.shape[1]] = (i * 37 % 256, 0, 255)
        ok, buf = cv2.imencode(".jpg", copy, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        out.append(buf.tobytes())
    assert len({hashlib.sha256(b).digest() for b in out}) == n
    return out


def assert_matches_reference(body: dict[str, Any], data: bytes, reference: Detector) -> None:
    image = prepare(data, ImageLimits()).image
    want = reference.detect([image])[0]
    got = body["detections"]
    assert [d["class_name"] for d in got] == [w.class_name for w in want]
    for d, w in zip(got, want, strict=True):
        assert abs(d["score"] - w.score) <= 1e-3
        b = d["box"]
        assert np.allclose([b["x1"], b["y1"], b["x2"], b["y2"]], w.box, atol=1.0)
    assert (body["image"]["width"], body["image"]["height"]) == (image.shape[1], image.shape[0])


# ------------------------------------------------------------------------------------------- sync detect


def test_sync_detect_returns_documented_detections(gw: Gateway, reference: Detector, sample_jpeg: bytes) -> None:
    r = gw.detect(tenant(), sample_jpeg)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "OK" and r.headers["X-Request-Id"] == body["request_id"]
    assert body["image"]["id"] == hashlib.sha256(sample_jpeg).hexdigest()
    assert body["model"]["name"] == "yolov4-tiny" and body["model"]["version"] >= 1
    assert {"scan", "inference", "postprocess"} <= set(body["timings_ms"])
    classes = [d["class_name"] for d in body["detections"]]
    assert "bus" in classes and classes.count("person") >= 3
    w, h = body["image"]["width"], body["image"]["height"]
    for d in body["detections"]:
        assert d["box_normalized"]["x2"] == pytest.approx(d["box"]["x2"] / w, abs=1e-4)
        assert d["box_normalized"]["y1"] == pytest.approx(d["box"]["y1"] / h, abs=1e-4)
    assert_matches_reference(body, sample_jpeg, reference)
    assert "RateLimit-Remaining" in r.headers


def test_multipart_json_reference_and_coco_give_the_same_detections(gw: Gateway, sample_images: dict[str, Path],
                                                                     ) -> None:
    t = tenant()
    data = sample_images["zidane.jpg"].read_bytes()
    raw = gw.detect(t, data, params={"score_threshold": 0.3}).json()
    form = gw.call("POST", "/v1/detect", t, files={"image": ("z.jpg", data, "image/jpeg")},
                   data={"params": json.dumps({"score_threshold": 0.3})}).json()
    assert form["detections"] == raw["detections"]
    # An object uploaded through a pre-signed URL, named in a JSON call.
    grant = gw.call("POST", "/v1/uploads", t, json={"files": [{"content_type": "image/jpeg",
                                                              "content_length": len(data)}]})
    assert grant.status_code == 201, grant.text
    up = grant.json()["uploads"][0]
    assert requests.put(up["url"], data=data, headers=up["headers"], timeout=30, verify=gw.verify).status_code == 200
    ref = gw.call("POST", "/v1/detect", t, json={"image": {"upload_id": up["upload_id"]},
                                                  "params": {"score_threshold": 0.3}})
    assert ref.status_code == 200, ref.text
    assert ref.json()["detections"] == raw["detections"]
    coco = gw.detect(t, data, params={"score_threshold": 0.3, "format": "coco"}).json()
    assert len(coco) == len(raw["detections"])
    for c, d in zip(coco, raw["detections"], strict=True):
        assert c["category_id"] == d["class_id"] and c["score"] == d["score"]
        assert c["bbox"][2] == pytest.approx(d["box"]["x2"] - d["box"]["x1"], abs=0.02)


def test_presigned_put_is_bound_to_length_and_type(gw: Gateway, sample_jpeg: bytes) -> None:
    t = tenant()
    up = gw.call("POST", "/v1/uploads", t, json={"files": [{"content_type": "image/jpeg",
                                                            "content_length": len(sample_jpeg)}]}).json()["uploads"][0]
    longer = requests.put(up["url"], data=sample_jpeg + b"x",
                          headers={**up["headers"], "Content-Length": str(len(sample_jpeg) + 1)}, timeout=30,
                          verify=gw.verify)
    assert longer.status_code == 403
    other_type = requests.put(up["url"], data=sample_jpeg, headers={**up["headers"], "Content-Type": "image/png"},
                              timeout=30, verify=gw.verify)
    assert other_type.status_code == 403
    assert requests.put(up["url"], data=sample_jpeg, headers=up["headers"], timeout=30,
                        verify=gw.verify).status_code == 200
    bad = gw.call("POST", "/v1/uploads", t, json={"files": [{"content_type": "application/pdf",
                                                             "content_length": 10}]})
    assert bad.status_code == 415 and bad.headers["Content-Type"].startswith(PROBLEM)


def test_past_the_deadline_the_call_is_accepted_and_the_result_is_still_stored(gw: Gateway,
                                                                                sample_images: dict[str, Path]) -> None:
    t = tenant()
    data = variants(sample_images["horses.jpg"].read_bytes(), 1, seed=11)[0]
    r = gw.detect(t, data, params={"timeout_ms": 1})
    assert r.status_code == 202, r.text
    rid = r.json()["request_id"]
    assert r.headers["Location"] == f"/v1/requests/{rid}" and r.json()["status"] == "PENDING"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        body = gw.call("GET", f"/v1/requests/{rid}", t).json()
        if body["status"] != "PENDING":
            break
        time.sleep(0.2)
    assert body["status"] == "OK" and body["request_id"] == rid
    assert any(d["class_name"] == "horse" for d in body["detections"])


def test_two_hundred_concurrent_sync_calls_all_get_correct_answers(gw: Gateway, reference: Detector,
                                                                  sample_images: dict[str, Path]) -> None:
    t = tenant()
    names = ["bus.jpg", "zidane.jpg", "dog.jpg", "horses.jpg", "kite.jpg", "giraffe.jpg", "person.jpg", "eagle.jpg"]
    bodies = [b for i, n in enumerate(names) for b in variants(sample_images[n].read_bytes(), 25, seed=100 * i)]
    headers = {**gw.auth(t), "Content-Type": "image/jpeg"}

    async def run() -> list[tuple[int, Any]]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ssl=gw.tls)) as session:
            async def one(data: bytes) -> tuple[int, Any]:
                async with session.post(gw.url + "/v1/detect?timeout_ms=170000", data=data, headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=180)) as resp:
                    return resp.status, await resp.json(content_type=None)
            return await asyncio.gather(*(one(b) for b in bodies))

    responses = asyncio.run(run())
    statuses = [s for s, _ in responses]
    assert statuses.count(200) == len(bodies), {s: statuses.count(s) for s in set(statuses)}
    assert len({body["request_id"] for _, body in responses}) == len(bodies)
    for data, (_, body) in zip(bodies, responses, strict=True):
        assert body["image"]["id"] == hashlib.sha256(data).hexdigest()
        assert_matches_reference(body, data, reference)


# ------------------------------------------------------------------------------------------- auth


def test_forged_expired_and_unsigned_tokens_are_refused(gw: Gateway) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    claims = {"iss": "detectflow", "aud": "detectflow-api", "sub": "x", "tenant": "t1", "scope": "results:read",
              "exp": int(time.time()) + 600}
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = json.loads(gw.keys.jwks_file.read_text())["keys"][0]["kid"]
    public_pem = serialization.load_pem_private_key(gw.keys.private_key_file.read_bytes(), None).public_key() \
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header_none = jwt.utils.base64url_encode(b'{"alg":"none","typ":"JWT"}').decode()
    payload = jwt.utils.base64url_encode(json.dumps(claims).encode()).decode()
    header_hs = jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT"}').decode()
    confused_signing = f"{header_hs}.{payload}"
    confused = confused_signing + "." + jwt.utils.base64url_encode(
        hmac.new(public_pem, confused_signing.encode(), hashlib.sha256).digest()).decode()
    tokens = {
        "missing": None,
        "alg none": f"{header_none}.{payload}.",
        "forged (another RSA key)": jwt.encode(claims, other_key, algorithm="RS256", headers={"kid": kid}),
        "key confusion (HS256 keyed with the RSA public key)": confused,
        "expired": gw.token("t1", ["results:read"], ttl_s=-120),
        "not yet valid": jwt.encode({**claims, "nbf": int(time.time()) + 3600},
                                    gw.keys.private_key_file.read_bytes(), algorithm="RS256", headers={"kid": kid}),
        "wrong audience": gw.token("t1", ["results:read"], audience="someone-else"),
        "wrong issuer": gw.token("t1", ["results:read"], issuer="evil"),
        "garbage": "not.a.jwt",
    }
    for name, token in tokens.items():
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        r = gw.call("GET", "/v1/requests/whatever", headers=headers)
        assert r.status_code == 401, (name, r.status_code, r.text)
        assert r.headers["Content-Type"].startswith(PROBLEM) and "WWW-Authenticate" in r.headers, name
    # The same claims, properly signed, pass authentication (404: no such request), with HS256 too.
    assert gw.call("GET", "/v1/requests/whatever", "t1").status_code == 404
    hs = gw.token("t1", ["results:read"], algorithm="HS256")
    assert gw.call("GET", "/v1/requests/whatever", headers={"Authorization": f"Bearer {hs}"}).status_code == 404


def test_scopes_are_enforced(gw: Gateway, sample_jpeg: bytes) -> None:
    t = tenant()
    read_only = gw.auth(t, ["results:read"])
    r = gw.call("POST", "/v1/detect", headers={**read_only, "Content-Type": "image/jpeg"}, data=sample_jpeg)
    assert r.status_code == 403 and r.json()["code"] == "INSUFFICIENT_SCOPE"
    assert gw.call("GET", "/v1/audit", t).status_code == 403
    assert gw.call("GET", "/v1/audit", headers=gw.auth(t, ["admin"])).status_code == 200


# ------------------------------------------------------------------------------------------- tenancy


def test_tenants_cannot_read_list_or_delete_each_others_data(gw: Gateway, stack: StackSettings,
                                                             sample_images: dict[str, Path]) -> None:
    a, b = tenant(), tenant()
    data = sample_images["kite.jpg"].read_bytes()
    detected = gw.detect(a, data).json()
    rid, sha = detected["request_id"], detected["image"]["id"]
    client = JobsClient(None, gw.url, gw.token(a))  # type: ignore[arg-type]

    async def make_job() -> dict[str, Any]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=gw.tls)) as session:
            client.session = session
            ids = await client.upload([(data, "image/jpeg")])
            return await client.submit_job(ids)

    job = asyncio.run(make_job())
    for path in (f"/v1/requests/{rid}", f"/v1/jobs/{job['job_id']}", f"/v1/jobs/{job['job_id']}/results"):
        r = gw.call("GET", path, b)
        assert r.status_code == 404, (path, r.text)
        assert gw.call("GET", path, a).status_code == 200, path
    assert gw.call("DELETE", f"/v1/images/{sha}", b).status_code == 404
    # Naming tenant A's object from tenant B is "not found" too.
    r = gw.call("POST", "/v1/detect", b, json={"image": {"key": f"{a}/{sha}"}})
    assert r.status_code == 404, r.text
    r = gw.call("POST", "/v1/jobs", b, json={"items": [{"key": f"{a}/{sha}"}]})
    assert r.status_code == 404, r.text
    # A still has everything.
    assert gw.call("GET", f"/v1/requests/{rid}", a).json()["status"] == "OK"
    assert root_minio(gw.pipeline.stack).stat_object("uploads", f"{a}/{sha}").size == len(data)


# ------------------------------------------------------------------------------------------- validation


def test_bad_input_gets_problem_details(gw: Gateway, sample_jpeg: bytes) -> None:
    t = tenant()
    cases = [
        (gw.detect(t, minimal_pdf()), 415, "UNSUPPORTED_MEDIA_TYPE"),
        (gw.detect(t, minimal_pdf(), content_type="application/pdf"), 415, "UNSUPPORTED_MEDIA_TYPE"),
        (gw.detect(t, b""), 400, "INVALID_REQUEST"),
        (gw.detect(t, png_header_bomb(50000, 50000), content_type="image/png"), 422, "IMAGE_REJECTED"),
        (gw.detect(t, sample_jpeg, params={"score_threshold": "2"}), 400, "INVALID_PARAMS"),
        (gw.detect(t, sample_jpeg, params={"max_detections": "0"}), 400, "INVALID_PARAMS"),
        (gw.detect(t, sample_jpeg, params={"classes": "person,unicorn"}), 400, "INVALID_PARAMS"),
        (gw.detect(t, sample_jpeg, params={"model": "no-such-model"}), 400, "INVALID_PARAMS"),
        (gw.detect(t, sample_jpeg, params={"format": "xml"}), 400, "INVALID_PARAMS"),
        (gw.call("POST", "/v1/detect", t, data=b"{", headers={"Content-Type": "application/json"}), 400,
         "INVALID_REQUEST"),
        (gw.call("POST", "/v1/jobs", t, json={"items": [{"upload_id": "x"}]}), 400, "INVALID_REQUEST"),
        (gw.call("POST", "/v1/jobs", t, json={"items": [{"upload_id": uuid.uuid4().hex}] * 10001}), 422,
         "TOO_MANY_ITEMS"),
        (gw.call("GET", "/v1/jobs/nope/results", t, params={"page_token": "%%%"}), 400, "INVALID_PARAMS"),
        (gw.detect(t, b"\xff\xd8\xff" + b"\0" * (21 * 1024 * 1024)), 413, "BODY_TOO_LARGE"),
    ]
    for r, status, code in cases:
        assert (r.status_code, r.json().get("code")) == (status, code), (status, code, r.status_code, r.text[:300])
        assert r.headers["Content-Type"].startswith(PROBLEM)
        assert r.json()["status"] == status and r.json()["title"] and r.json()["type"].startswith("https://")
    rejected = cases[3][0].json()
    assert rejected["image_code"] == "PIXEL_LIMIT_EXCEEDED"


def test_idempotency_key(gw: Gateway, sample_images: dict[str, Path]) -> None:
    t = tenant()
    data = sample_images["eagle.jpg"].read_bytes()
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = gw.detect(t, data, headers=key)
    second = gw.detect(t, data, headers=key)
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    other = gw.detect(t, sample_images["dog.jpg"].read_bytes(), headers=key)
    assert other.status_code == 422 and other.json()["code"] == "IDEMPOTENCY_KEY_REUSED"
    # Another tenant's identical key is its own.
    assert gw.detect(tenant(), data, headers=key).json()["request_id"] != first.json()["request_id"]


# ------------------------------------------------------------------------------------------- jobs


def test_a_job_of_500_images_completes_and_its_pages_hold_each_item_once(gw: Gateway, stack: StackSettings,
                                                                        sample_images: dict[str, Path]) -> None:
    t = tenant()
    names = sorted(n for n in sample_images if n.endswith(".jpg"))
    per = -(-500 // len(names))
    bodies = [b for i, n in enumerate(names) for b in variants(sample_images[n].read_bytes(), per, seed=7 * i)][:500]
    client = JobsClient(None, gw.url, gw.token(t), timeout_s=120)  # type: ignore[arg-type]

    async def run() -> tuple[dict[str, Any], dict[str, Any], list[list[dict[str, Any]]]]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=gw.tls)) as session:
            client.session = session
            ids = await client.upload([(b, "image/jpeg") for b in bodies])
            job = await client.submit_job(ids)
            status = await client.wait_job(job["job_id"], 900)
            pages, token = [], None
            while True:
                q = "?page_size=37" + (f"&page_token={token}" if token else "")
                page = await client.call("GET", f"/v1/jobs/{job['job_id']}/results{q}")
                pages.append(page["items"])
                token = page["next_page_token"]
                if not token:
                    return job, status, pages

    job, status, pages = asyncio.run(run())
    assert status["status"] == "COMPLETED" and status["total"] == 500 and status["done"] == 500
    assert status["counts"]["OK"] == 500, status
    items = [item for page in pages for item in page]
    assert len(pages) == 14 and all(len(p) == 37 for p in pages[:-1])
    assert len(items) == 500 and {i["request_id"] for i in items} == set(job["request_ids"])
    assert {i["image"]["id"] for i in items} == {hashlib.sha256(b).hexdigest() for b in bodies}
    # The job-completed event, in the registry's wire format.
    serde = AvroSerde.from_url(stack.registry_url, stack.tls_ca_file)
    events = [serde.decode(m.value(), "JobEvent") for m in
              read_all(stack, f"{gw.pipeline.prefix}jobs.events", until=1, timeout_s=60)]
    mine = [e for e in events if e["job_id"] == job["job_id"]]
    assert mine and mine[0]["total"] == 500 and mine[0]["ok"] == 500 and mine[0]["tenant"] == t


# ------------------------------------------------------------------------------------------- deletion + audit


def test_delete_image_removes_object_results_and_cache(gw: Gateway, sample_images: dict[str, Path]) -> None:
    t = tenant()
    data = variants(sample_images["giraffe.jpg"].read_bytes(), 1, seed=5)[0]
    first = gw.detect(t, data).json()
    again = gw.detect(t, data).json()
    assert again["cache_hit"] is True
    sha = first["image"]["id"]
    r = gw.call("DELETE", f"/v1/images/{sha}", t)
    assert r.status_code == 200, r.text
    assert r.json()["requests_deleted"] == 2 and r.json()["objects_deleted"] == 1
    for rid in (first["request_id"], again["request_id"]):
        assert gw.call("GET", f"/v1/requests/{rid}", t).status_code == 404
    from minio.error import S3Error

    with pytest.raises(S3Error):
        root_minio(gw.pipeline.stack).stat_object("uploads", f"{t}/{sha}")
    assert gw.call("DELETE", f"/v1/images/{sha}", t).status_code == 404
    fresh = gw.detect(t, data).json()  # the cache went with it: the model runs again
    assert fresh["cache_hit"] is False and fresh["status"] == "OK"
    deadline = time.monotonic() + 30  # audit events are written off the request path (gateway/audit.py)
    deletes: list[dict[str, Any]] = []
    while len(deletes) < 2 and time.monotonic() < deadline:
        events = gw.call("GET", "/v1/audit", headers=gw.auth(t, ["admin"])).json()["events"]
        deletes = [e for e in events if e["action"] == "images.delete"]
        time.sleep(0.2)
    assert [e["outcome"] for e in deletes] == ["rejected", "success"] and deletes[1]["resource"] == sha


def test_every_authenticated_call_is_audited_to_the_table_and_the_topic(gw: Gateway, stack: StackSettings,
                                                                         sample_jpeg: bytes) -> None:
    t = tenant()
    ok = gw.detect(t, sample_jpeg).json()
    gw.call("GET", f"/v1/requests/{ok['request_id']}", t)
    gw.call("GET", "/v1/requests/unknown", t)
    gw.call("POST", "/v1/detect", headers={**gw.auth(t, ["results:read"]), "Content-Type": "image/jpeg"},
            data=sample_jpeg)
    admin = gw.auth(t, ["admin"], subject="auditor")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        events = gw.call("GET", "/v1/audit", headers=admin).json()["events"]
        if len(events) >= 4:
            break
        time.sleep(0.2)
    got = sorted((e["action"], e["outcome"], e["status"]) for e in events if e["action"] != "audit.read")
    assert got == [("detect", "denied", 403), ("detect", "success", 200), ("requests.read", "rejected", 404),
                   ("requests.read", "success", 200)]
    assert all(e["subject"] == f"dev:{t}" for e in events if e["action"] != "audit.read")
    serde = AvroSerde.from_url(stack.registry_url, stack.tls_ca_file)
    deadline = time.monotonic() + 30
    mine: list[dict[str, Any]] = []
    while time.monotonic() < deadline and len(mine) < 4:
        msgs = read_all(stack, f"{gw.pipeline.prefix}audit", until=10**9, timeout_s=0.5)
        mine = [e for e in (serde.decode(m.value(), "AuditEvent") for m in msgs)
                if e["tenant"] == t and e["action"] != "audit.read"]
    assert len(mine) == 4 and {e["request_id"] for e in mine if e["action"] == "detect"} >= {ok["request_id"]}


# ------------------------------------------------------------------------------------------- operations


def test_operations_endpoints(gw: Gateway) -> None:
    assert requests.get(gw.url + "/livez", timeout=5, verify=gw.verify).json() == {"status": "live"}
    ready = requests.get(gw.url + "/readyz", timeout=10, verify=gw.verify).json()
    assert ready == {"status": "ready", "checks": {"kafka": "ok", "minio": "ok", "cassandra": "ok"}}
    spec = requests.get(gw.url + "/openapi.json", timeout=5, verify=gw.verify).json()
    assert spec["openapi"].startswith("3.1") and "/v1/detect" in spec["paths"]
    metrics = requests.get(gw.url + "/metrics", timeout=5, verify=gw.verify).text
    assert "detectflow_http_requests_total" in metrics and "detectflow_sync_inflight" in metrics
    unknown = requests.get(gw.url + "/v1/nothing", timeout=5, verify=gw.verify)
    assert unknown.status_code == 404 and unknown.headers["Content-Type"].startswith(PROBLEM)


# ------------------------------------------------------------------------------------------- fuzzing




def test_fuzzed_requests_get_no_server_error_and_match_the_spec(gw: Gateway) -> None:
    """schemathesis against the live gateway, every operation of /openapi.json: no 5xx, and status codes,
    content types and bodies conform to the document. (Driven through hypothesis directly: schemathesis'
    pytest plugin does not run under this pytest.)"""
    schema = schemathesis.openapi.from_url(gw.url + "/openapi.json", verify=gw.verify)
    headers = gw.auth("fuzz", ["admin"])
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 11
    failures = []
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case: Any) -> None:
            response = case.call(base_url=gw.url, headers={**headers, **(case.headers or {})}, timeout=120,
                                 verify=gw.verify)
            case.validate_response(response, checks=checks)

        try:
            fuzz()
        except Exception as exc:
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert not failures, "\n\n".join(failures)

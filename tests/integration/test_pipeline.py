"""The detection pipeline end to end on the real stack: every role as its own supervised process."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from imaging_fixtures import exif_jpeg, minimal_pdf, png_header_bomb, truncated_jpeg
from object_kit import minio_as
from pipeline_kit import Pipeline, start_pipeline
from stream_kit import read_all

from config import StackSettings
from infra.stack import manager
from model_store.detect import Detector
from processors.imaging import ImageLimits, prepare
from stream.serde import AvroSerde
from stream.topics import detections_topic, dlq_topic, lane_topic, retry_topic

# Built from parts so this file itself is not flagged by a scanner.
EICAR = ("X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + "EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*").encode()


@pytest.fixture(scope="module")
def pipeline(stack: StackSettings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    prefix = f"pl{uuid.uuid4().hex[:6]}."
    yield from start_pipeline(stack, prefix, tmp_path_factory.mktemp("pipeline-logs"))


@pytest.fixture(scope="module")
def reference(stack: StackSettings) -> Detector:
    from model_store.convert import default_out_dir

    return Detector.from_model_dir(default_out_dir(), conf_threshold=0.25, iou_threshold=0.45, max_detections=100)


def _detect_all(pipeline: Pipeline, tenant: str, images: list[bytes], *, lane: str = "online",
                timeout_s: float = 180.0, **kwargs: Any) -> list[dict[str, Any]]:
    with pipeline.client(tenant) as client:
        subs = [client.submit(data, lane=lane, timeout_s=timeout_s, **kwargs) for data in images]
        client.flush()
        return [client.wait(s) for s in subs]


def _assert_matches(served: list[dict[str, Any]], expected: list[Any], name: str) -> None:
    assert len(served) == len(expected), f"{name}: {len(served)} served vs {len(expected)} expected"
    for got, want in zip(served, expected, strict=True):
        assert got["class_name"] == want.class_name, name
        assert abs(got["score"] - want.score) <= 1e-3, (name, got["score"], want.score)
        box = got["box"]
        assert np.allclose([box["x1"], box["y1"], box["x2"], box["y2"]], want.box, atol=1.0), (name, box, want.box)


def test_served_detections_equal_the_offline_reference(pipeline: Pipeline, reference: Detector,
                                                       sample_images: dict[str, Path]) -> None:
    names = sorted(sample_images)
    datas = [sample_images[n].read_bytes() for n in names]
    results = _detect_all(pipeline, "parity", datas)
    for name, data, result in zip(names, datas, results, strict=True):
        assert result["status"] == "OK", (name, result.get("error_code"), result.get("error_message"))
        image = prepare(data, ImageLimits()).image
        assert (result["image_width"], result["image_height"]) == (image.shape[1], image.shape[0])
        _assert_matches(result["detections"], reference.detect([image])[0], name)
        for d in result["detections"]:
            norm, box = d["box_norm"], d["box"]
            assert norm["x2"] == pytest.approx(box["x2"] / result["image_width"], abs=1e-6)
    bus = results[names.index("bus.jpg")]
    classes = [d["class_name"] for d in bus["detections"]]
    assert "bus" in classes and classes.count("person") >= 3
    assert bus["model_name"] == "yolov4-tiny" and bus["model_version"] >= 1


ROTATIONS = {3: cv2.ROTATE_180, 6: cv2.ROTATE_90_CLOCKWISE, 8: cv2.ROTATE_90_COUNTERCLOCKWISE}


def test_exif_rotated_copies_give_boxes_in_the_rotated_frame(pipeline: Pipeline, reference: Detector,
                                                             sample_jpeg: bytes) -> None:
    upright = cv2.imdecode(np.frombuffer(sample_jpeg, np.uint8), cv2.IMREAD_COLOR)
    copies = {o: exif_jpeg(sample_jpeg, o) for o in ROTATIONS}
    results = _detect_all(pipeline, "exif", list(copies.values()))
    for (orientation, rotation), result in zip(ROTATIONS.items(), results, strict=True):
        assert result["status"] == "OK", result
        rotated = cv2.rotate(upright, rotation)
        assert (result["image_width"], result["image_height"]) == (rotated.shape[1], rotated.shape[0])
        _assert_matches(result["detections"], reference.detect([rotated])[0], f"orientation {orientation}")


@pytest.mark.parametrize(("name", "code"), [
    ("eicar", "VIRUS_DETECTED"), ("truncated_jpeg", "TRUNCATED_IMAGE"), ("png_bomb", "PIXEL_LIMIT_EXCEEDED"),
    ("pdf", "UNSUPPORTED_FORMAT"), ("empty", "EMPTY_IMAGE")])
def test_bad_input_is_rejected_with_its_code(pipeline: Pipeline, stack: StackSettings, sample_jpeg: bytes,
                                             name: str, code: str) -> None:
    data = {"eicar": EICAR, "truncated_jpeg": truncated_jpeg(sample_jpeg), "png_bomb": png_header_bomb(50000, 50000),
            "pdf": minimal_pdf(), "empty": b""}[name]
    (result,) = _detect_all(pipeline, f"bad-{name.replace('_', '-')}", [data], timeout_s=90)
    assert (result["status"], result["error_code"]) == ("REJECTED", code), result
    assert result["error_message"]
    if code == "VIRUS_DETECTED":
        assert "Detectflow.Test.Eicar" in result["error_message"]
    # Every outcome is stored, whichever stage closed the request (the recorder persists it).
    from processors.results import ResultStore
    from stream.cassandra import connect

    # As the gateway: the role that reads results back (the recorder only writes them).
    store = ResultStore(connect(pipeline.settings.stream, "gateway"), result_ttl_s=60, cache_ttl_s=60)
    deadline = time.monotonic() + 30
    stored = None
    while stored is None and time.monotonic() < deadline:
        stored = store.get_result(result["tenant"], result["request_id"])
        time.sleep(0.2)
    assert stored is not None and stored["error_code"] == code


def test_a_preprocess_rejection_is_dead_lettered_with_provenance(pipeline: Pipeline, stack: StackSettings) -> None:
    (result,) = _detect_all(pipeline, "dlq", [minimal_pdf()])
    dlq = dlq_topic(lane_topic(pipeline.prefix, "online", "scanned"))
    deadline = time.monotonic() + 30
    letters: list[Any] = []
    while not letters and time.monotonic() < deadline:
        serde = AvroSerde.from_url(stack.registry_url, stack.tls_ca_file)
        letters = [serde.decode(m.value(), "DeadLetter") for m in read_all(stack, dlq, until=10**6, timeout_s=1)]
        letters = [x for x in letters if x["request_id"] == result["request_id"]]
    assert len(letters) == 1
    assert letters[0]["stage"] == "preprocess" and letters[0]["error_class"] == "InvalidRecord"
    assert letters[0]["topic"] == lane_topic(pipeline.prefix, "online", "scanned")


def test_infected_object_is_moved_to_quarantine(pipeline: Pipeline, stack: StackSettings) -> None:
    creds = stack.minio_credentials()
    client = minio_as(stack, creds)
    tenant = f"q{uuid.uuid4().hex[:6]}"
    key = f"{tenant}/infected.bin"
    client.put_object("uploads", key, io.BytesIO(EICAR), len(EICAR), metadata={"detectflow-submitted": "true"})
    with pipeline.client(tenant) as dc:
        result = dc.wait(dc.submit_ref("uploads", key, timeout_s=60))
    assert (result["status"], result["error_code"]) == ("REJECTED", "VIRUS_DETECTED")
    assert [o.object_name for o in client.list_objects("uploads", prefix=f"{tenant}/")] == []
    sha = hashlib.sha256(EICAR).hexdigest()
    assert client.stat_object("quarantine", f"{tenant}/{sha}").size == len(EICAR)


def test_another_tenants_object_is_refused(pipeline: Pipeline, stack: StackSettings) -> None:
    with pipeline.client("mallory") as dc:
        result = dc.wait(dc.submit_ref("uploads", "alice/photo.jpg", timeout_s=60))
    assert (result["status"], result["error_code"]) == ("REJECTED", "FORBIDDEN_OBJECT")


def test_same_image_same_tenant_is_answered_from_the_cache(pipeline: Pipeline, sample_images: dict[str, Path]) -> None:
    data = sample_images["zidane.jpg"].read_bytes()
    tenant = f"cache{uuid.uuid4().hex[:6]}"
    (first,) = _detect_all(pipeline, tenant, [data])
    (second,) = _detect_all(pipeline, tenant, [data])
    (other,) = _detect_all(pipeline, tenant + "b", [data])
    assert first["status"] == second["status"] == "OK"
    assert (first["cache_hit"], second["cache_hit"], other["cache_hit"]) == (False, True, False)
    assert second["request_id"] != first["request_id"] and second["tenant"] == tenant
    assert second["detections"] == first["detections"]
    assert second["model_version"] == first["model_version"]
    (stricter,) = _detect_all(pipeline, tenant, [data], params={"score_threshold": 0.6})
    assert stricter["cache_hit"] is False
    assert all(d["score"] >= 0.6 for d in stricter["detections"])


def test_a_request_past_its_deadline_is_dropped_before_the_model(pipeline: Pipeline, sample_jpeg: bytes) -> None:
    past = int(time.time() * 1000) - 1000
    (result,) = _detect_all(pipeline, f"late{uuid.uuid4().hex[:4]}", [sample_jpeg], deadline_ms=past)
    assert (result["status"], result["error_code"]) == ("FAILED", "DEADLINE_EXCEEDED")


def test_records_wait_while_clamd_is_down_and_complete_when_it_is_back(pipeline: Pipeline, stack: StackSettings,
                                                                       sample_images: dict[str, Path]) -> None:
    datas = [sample_images[n].read_bytes() for n in ("dog.jpg", "horses.jpg", "kite.jpg")]
    retry = retry_topic(lane_topic(pipeline.prefix, "batch", "submitted"))
    before = len(read_all(stack, retry, until=0, timeout_s=0))
    manager.down(stack, ["clamd"])
    try:
        with pipeline.client(f"clam{uuid.uuid4().hex[:6]}") as client:
            subs = [client.submit(d, lane="batch", timeout_s=240) for d in datas]
            client.flush()
            # The scan stage backs off, then parks the records on its retry topic: proof they are waiting.
            assert len(read_all(stack, retry, until=before + len(datas), timeout_s=60)) >= before + len(datas)
            manager.up(stack, ["clamd"])
            results = [client.wait(s) for s in subs]
    finally:
        manager.up(stack, ["clamd"])
    assert [r["status"] for r in results] == ["OK"] * len(datas), [r.get("error_code") for r in results]


def test_inference_killed_mid_batch_still_gives_one_result_per_request(pipeline: Pipeline, stack: StackSettings,
                                                                       sample_images: dict[str, Path]) -> None:
    names = sorted(sample_images)
    datas = [sample_images[names[i % len(names)]].read_bytes() for i in range(48)]
    tenant = f"kill{uuid.uuid4().hex[:6]}"
    topic = detections_topic(pipeline.prefix)
    seen_before = len(read_all(stack, topic, until=0, timeout_s=0))
    with pipeline.client(tenant) as client:
        subs = [client.submit(d, lane="batch", timeout_s=300) for d in datas]
        client.flush()
        first = client.wait(subs[0])
        assert first["status"] == "OK"
        os.kill(pipeline.pid("inference"), signal.SIGKILL)  # mid-stream: later records are in flight
        results = [first] + [client.wait(s) for s in subs[1:]]
    assert all(r["status"] == "OK" for r in results), [r.get("error_code") for r in results]
    wanted = {s.request_id for s in subs}
    deadline = time.monotonic() + 60
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        msgs = read_all(stack, topic, until=seen_before + len(wanted), timeout_s=2)
        counts = {}
        for m in msgs:
            rid = m.key().decode()
            if rid in wanted:
                counts[rid] = counts.get(rid, 0) + 1
        if len(counts) == len(wanted):
            break
    assert set(counts) == wanted
    assert max(counts.values()) == 1, {k: v for k, v in counts.items() if v > 1}
    assert pipeline.supervisor.children["inference"].restarts >= 1

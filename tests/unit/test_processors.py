"""The pipeline stages' process() with fakes for MinIO, clamd and Cassandra (no services)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from config import PipelineSettings, StreamSettings
from imaging.letterbox import letterbox
from model_store.serving.catalog import ModelCatalog
from model_store.serving.config import CONFIG_FILE, MODEL_FILE
from model_store.serving.pool import LoadedModel, ModelPool
from model_store.serving.routing import Routing, RoutingTable
from processors.inference import InferenceStage
from processors.params import CacheKey, effective_params
from processors.postprocess import PostprocessStage
from processors.recorder import RecorderStage
from processors.scan import ScanStage
from processors.scanner import ScanVerdict
from stream.errors import InvalidRecord, TransientError
from stream.records import Failure, Record, now_ms

SETTINGS = PipelineSettings(stream=StreamSettings(topic_prefix="u."), models_dir=Path("/nonexistent"))


@pytest.fixture()
def catalog(tmp_path: Path) -> ModelCatalog:
    from model_store.tools.convert import default_out_dir

    src = default_out_dir()
    if not (src / CONFIG_FILE).is_file():
        pytest.skip("default model not converted")
    for version in (1, 2):
        d = tmp_path / "yolov4-tiny" / str(version)
        d.mkdir(parents=True)
        (d / CONFIG_FILE).write_text((src / CONFIG_FILE).read_text())
        (d / MODEL_FILE).write_bytes(b"not a real model: the fakes never open it")
    # The registry's state: v1 pushed, then v2 pushed and promoted.
    routing = Routing("yolov4-tiny").pushed(1).pushed(2).promoted(2)
    table = RoutingTable()
    table.apply({"action": "PROMOTED", "model_name": "yolov4-tiny", **routing.event_fields()})
    return ModelCatalog(tmp_path, table=table)


class FakeObjects:
    def __init__(self, objects: dict[tuple[str, str], bytes] | None = None):
        self.objects = dict(objects or {})
        self.quarantined: dict[tuple[str, str], bytes] = {}

    def get(self, bucket: str, key: str, max_bytes: int) -> bytes:
        if (bucket, key) not in self.objects:
            raise InvalidRecord("OBJECT_NOT_FOUND", key)
        return self.objects[(bucket, key)]

    def quarantine(self, dest_bucket: str, dest_key: str, *, data: bytes | None = None,
                   source: tuple[str, str] | None = None, metadata: dict[str, Any] | None = None) -> None:
        self.quarantined[(dest_bucket, dest_key)] = data if source is None else self.objects.pop(source)


class FakeScanner:
    name = "fake-clamd"

    def __init__(self, infected: bytes = b"VIRUS", down: bool = False):
        self.infected = infected
        self.down = down
        self.scanned = 0

    def scan(self, data: bytes) -> ScanVerdict:
        if self.down:
            raise TransientError("clamd unavailable")
        self.scanned += 1
        return ScanVerdict(False, "Test.Sig") if self.infected in data else ScanVerdict(True)


class FakeResults:
    def __init__(self) -> None:
        self.saved: list[dict[str, Any]] = []
        self.cache: dict[CacheKey, dict[str, Any]] = {}
        self.down = False

    def save_results(self, results: Any, *, supersede: bool = False, index: bool = True, cache: Any = ()) -> None:
        if self.down:
            raise TransientError("cassandra unavailable")
        self.saved += [dict(r) for r in results]
        self.cache.update({k: dict(r) for k, r in cache})

    def cache_put(self, entries: Any) -> None:
        if self.down:
            raise TransientError("cassandra unavailable")
        self.cache.update({k: dict(r) for k, r in entries})

    def cache_get(self, key: CacheKey) -> dict[str, Any] | None:
        return self.cache.get(key)


def record(value: dict[str, Any], lane: str = "online", headers: dict[str, bytes] | None = None) -> Record:
    return Record(topic=f"u.detect.{lane}.x", partition=0, offset=0, key=None, value=value,
                  headers=headers or {}, lane=lane)


def submitted(image: dict[str, Any], tenant: str = "t1", **extra: Any) -> dict[str, Any]:
    return {"request_id": extra.pop("request_id", "r1"), "tenant": tenant, "image": image, "lane": "ONLINE",
            "model": {"name": "yolov4-tiny", "version": None}, "params": {}, "deadline_ms": None,
            "job_id": None, "submitted_at": now_ms(), **extra}


# ---- scan ------------------------------------------------------------------------------------------


def test_scan_passes_clean_bytes_inline_with_the_resolved_version(catalog: ModelCatalog) -> None:
    stage = ScanStage(FakeObjects(), FakeScanner(), catalog, FakeResults(), SETTINGS)
    (out,) = stage.process([record(submitted({"data": b"clean image"}))])
    assert not isinstance(out, Failure)
    (o,) = out
    assert o.topic == "u.detect.online.scanned" and o.event == "ImageScanned"
    assert o.value["sha256"] == hashlib.sha256(b"clean image").hexdigest()
    assert o.value["image"]["data"] == b"clean image"
    assert o.value["context"]["model"] == {"name": "yolov4-tiny", "version": 2}  # production


def test_scan_rejects_infected_and_quarantines(catalog: ModelCatalog) -> None:
    objects = FakeObjects({("uploads", "t1/a.jpg"): b"xxVIRUSxx"})
    stage = ScanStage(objects, FakeScanner(), catalog, None, SETTINGS)
    (out,) = stage.process([record(submitted({"bucket": "uploads", "key": "t1/a.jpg"}),
                                   headers={"reply-to": b"u.detect.replies:3", "correlation-id": b"c"})])
    assert not isinstance(out, Failure)
    results = [o for o in out if o.event == "DetectionResult"]
    assert [o.topic for o in results] == ["u.detections", "u.detect.replies"] and results[1].partition == 3
    assert (results[0].value["status"], results[0].value["error_code"]) == ("REJECTED", "VIRUS_DETECTED")
    assert "Test.Sig" in results[0].value["error_message"]
    sha = hashlib.sha256(b"xxVIRUSxx").hexdigest()
    assert objects.quarantined == {("quarantine", f"t1/{sha}"): b"xxVIRUSxx"} and not objects.objects


@pytest.mark.parametrize(("image", "code"), [
    ({"bucket": "uploads", "key": "other/a.jpg"}, "FORBIDDEN_OBJECT"),
    ({"bucket": "models", "key": "t1/a.jpg"}, "FORBIDDEN_OBJECT"),
    ({"bucket": "uploads", "key": "t1/missing.jpg"}, "OBJECT_NOT_FOUND"),
    ({"data": b""}, "EMPTY_IMAGE"),
    ({"data": b"abc", "sha256": "0" * 64}, "CHECKSUM_MISMATCH"),
])
def test_scan_refuses_bad_submissions(catalog: ModelCatalog, image: dict[str, Any], code: str) -> None:
    stage = ScanStage(FakeObjects(), FakeScanner(), catalog, None, SETTINGS)
    (out,) = stage.process([record(submitted(image))])
    assert isinstance(out, Failure) and isinstance(out.error, InvalidRecord) and out.error.code == code


class CountingObjects(FakeObjects):
    def __init__(self, objects: dict[tuple[str, str], bytes] | None = None):
        super().__init__(objects)
        self.gets = 0

    def get(self, bucket: str, key: str, max_bytes: int) -> bytes:
        self.gets += 1
        return super().get(bucket, key, max_bytes)


def test_scan_reads_inline_bytes_of_a_stored_image_without_fetching_it(catalog: ModelCatalog) -> None:
    objects = CountingObjects({("uploads", "t1/a.jpg"): b"clean image"})
    stage = ScanStage(objects, FakeScanner(), catalog, None, SETTINGS)
    stored = {"bucket": "uploads", "key": "t1/a.jpg", "sha256": None, "size": 11, "content_type": "image/jpeg"}
    (out,) = stage.process([record(submitted({"data": b"clean image", "stored": stored}))])
    assert not isinstance(out, Failure)
    (o,) = out
    assert objects.gets == 0
    assert o.value["image"]["data"] == b"clean image"
    assert o.value["context"]["source"]["key"] == "t1/a.jpg"  # provenance: the durable copy


def test_scan_quarantines_the_stored_copy_of_infected_inline_bytes(catalog: ModelCatalog) -> None:
    objects = CountingObjects({("uploads", "t1/a.jpg"): b"xxVIRUSxx"})
    stage = ScanStage(objects, FakeScanner(), catalog, None, SETTINGS)
    stored = {"bucket": "uploads", "key": "t1/a.jpg"}
    (out,) = stage.process([record(submitted({"data": b"xxVIRUSxx", "stored": stored}))])
    assert not isinstance(out, Failure)
    assert out[0].value["error_code"] == "VIRUS_DETECTED"
    sha = hashlib.sha256(b"xxVIRUSxx").hexdigest()
    assert objects.quarantined == {("quarantine", f"t1/{sha}"): b"xxVIRUSxx"} and not objects.objects


def test_scan_refuses_inline_bytes_naming_another_tenants_object(catalog: ModelCatalog) -> None:
    objects = CountingObjects({("uploads", "other/a.jpg"): b"theirs"})
    stage = ScanStage(objects, FakeScanner(), catalog, None, SETTINGS)
    (out,) = stage.process([record(submitted({"data": b"xxVIRUSxx", "stored": {"bucket": "uploads",
                                                                              "key": "other/a.jpg"}}))])
    assert isinstance(out, Failure) and isinstance(out.error, InvalidRecord) and out.error.code == "FORBIDDEN_OBJECT"
    assert objects.objects == {("uploads", "other/a.jpg"): b"theirs"} and not objects.quarantined


def test_scan_fails_closed_when_clamd_is_down(catalog: ModelCatalog) -> None:
    stage = ScanStage(FakeObjects(), FakeScanner(down=True), catalog, None, SETTINGS)
    (out,) = stage.process([record(submitted({"data": b"clean"}))])
    assert isinstance(out, Failure) and isinstance(out.error, TransientError)


def test_scan_answers_from_the_cache_without_scanning(catalog: ModelCatalog) -> None:
    results, scanner = FakeResults(), FakeScanner()
    sha = hashlib.sha256(b"img").hexdigest()
    key = CacheKey("t1", sha, "yolov4-tiny", 2, effective_params({}, SETTINGS).digest())
    results.cache[key] = {"request_id": "old", "tenant": "t1", "status": "OK", "detections": [], "model_version": 2}
    stage = ScanStage(FakeObjects(), scanner, catalog, results, SETTINGS)
    (out,) = stage.process([record(submitted({"data": b"img"}, request_id="new"))])
    assert scanner.scanned == 0
    assert not isinstance(out, Failure)
    assert out[0].value["request_id"] == "new" and out[0].value["cache_hit"] is True
    (miss,) = stage.process([record(submitted({"data": b"img"}, tenant="t2"))])  # another tenant: no hit
    assert not isinstance(miss, Failure) and miss[0].event == "ImageScanned" and scanner.scanned == 1



def test_scan_skips_the_cache_for_a_while_after_a_lookup_fails(catalog: ModelCatalog,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Each lookup waits its query timeout while Cassandra is paused: one failure, then misses without asking.
    from processors import scan as scan_module

    class DownCache(FakeResults):
        lookups = 0

        def cache_get(self, key: CacheKey) -> dict[str, Any] | None:
            DownCache.lookups += 1
            raise TransientError("cassandra SELECT image_cache: OperationTimedOut")

    now = [1000.0]
    monkeypatch.setattr(scan_module.time, "monotonic", lambda: now[0])
    scanner = FakeScanner()
    stage = ScanStage(FakeObjects(), scanner, catalog, DownCache(), SETTINGS)
    outs = [stage._one(record(submitted({"data": f"img{i}".encode()}))) for i in range(3)]
    assert DownCache.lookups == 1 and scanner.scanned == 3  # scanned as misses, asked once
    assert all(o[0].event == "ImageScanned" for o in outs)
    now[0] += scan_module.CACHE_BREAK_S
    stage._one(record(submitted({"data": b"img3"})))
    assert DownCache.lookups == 2  # asked again once the break is over

def test_params_are_validated_and_hashed_stably() -> None:
    a = effective_params({"classes": ["dog", "cat"]}, SETTINGS)
    b = effective_params({"classes": ["cat", "dog"], "score_threshold": None}, SETTINGS)
    assert a == b and a.digest() == b.digest()
    assert effective_params({"score_threshold": 0.5}, SETTINGS).digest() != a.digest()
    with pytest.raises(InvalidRecord, match="INVALID_PARAMS"):
        effective_params({"max_detections": 0}, SETTINGS)
    with pytest.raises(InvalidRecord, match="INVALID_PARAMS"):
        effective_params({"classes": ["unicorn"]}, SETTINGS, ("cat", "dog"))


# ---- inference ---------------------------------------------------------------------------------------


def preprocessed(catalog: ModelCatalog, image: np.ndarray, request_id: str, **ctx: Any) -> dict[str, Any]:
    spec = catalog.get("yolov4-tiny", 1).config.input
    tensor, scale, (px, py) = letterbox(image, (spec.width, spec.height), spec.pad_value)
    context = {"request_id": request_id, "tenant": "t1", "lane": "BATCH", "model": {"name": "yolov4-tiny",
               "version": 1}, "params": {}, "deadline_ms": None, "job_id": None, "submitted_at": now_ms(),
               "source": None, **ctx}
    return {"context": context, "tensor": tensor.tobytes(), "shape": list(tensor.shape), "dtype": "uint8",
            "layout": "CHW", "image_sha256": "s" * 64, "image_format": "jpeg",
            "original_width": image.shape[1], "original_height": image.shape[0], "exif_orientation": 1,
            "letterbox": {"scale": scale, "pad_x": float(px), "pad_y": float(py), "input_width": spec.width,
                          "input_height": spec.height}, "timings_ms": {}}


def fake_model(calls: list[int]) -> Any:
    def load(mv: Any) -> LoadedModel:
        def run(batch: np.ndarray) -> dict[str, np.ndarray]:
            calls.append(batch.shape[0])
            out = np.zeros((batch.shape[0], mv.config.num_boxes, 5 + mv.config.num_classes), np.float32)
            out[:, 0, :5] = [100, 100, 50, 40, 0.9]   # one box: cx, cy, w, h, objectness
            out[:, 0, 5 + 16] = 1.0                   # class 16 (dog)
            out[:, 1, :5] = [200, 200, 10, 10, 0.1]   # below every threshold
            out[:, 1, 5] = 1.0
            return {"detections": out}
        return LoadedModel(mv, run, ["CPUExecutionProvider"])
    return load


def test_inference_batches_drops_expired_and_keeps_candidates_above_the_threshold(catalog: ModelCatalog) -> None:
    calls: list[int] = []
    stage = InferenceStage(catalog, SETTINGS.replace(inference_max_batch=4), ModelPool(catalog, fake_model(calls)))
    image = np.full((300, 400, 3), 90, np.uint8)
    recs = [record(preprocessed(catalog, image, f"r{i}"), lane="batch") for i in range(6)]
    recs.append(record(preprocessed(catalog, image, "late", deadline_ms=now_ms() - 5), lane="batch"))
    outs = stage.process(recs)
    assert calls == [4, 2]  # max batch 4, the expired record never reached the model
    late = outs[-1]
    assert not isinstance(late, Failure) and late[0].value["error_code"] == "DEADLINE_EXCEEDED"
    for out in outs[:-1]:
        assert not isinstance(out, Failure)
        ev = out[0].value
        assert out[0].topic == "u.detect.batch.inferred"
        assert [c["class_id"] for c in ev["candidates"]] == [16]
        assert ev["model_version"] == 1 and ev["batch_size"] in (4, 2)


def test_inference_refuses_a_tensor_that_breaks_the_input_contract(catalog: ModelCatalog) -> None:
    stage = InferenceStage(catalog, SETTINGS, ModelPool(catalog, fake_model([])))
    value = preprocessed(catalog, np.zeros((10, 10, 3), np.uint8), "r")
    value["shape"] = [3, 100, 100]
    (out,) = stage.process([record(value)])
    assert isinstance(out, Failure) and out.error.code == "INVALID_TENSOR"  # type: ignore[attr-defined]


# ---- postprocess --------------------------------------------------------------------------------------


def inferred(catalog: ModelCatalog, candidates: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
    value = preprocessed(catalog, np.zeros((832, 416, 3), np.uint8), "r1", params=params)
    value.pop("tensor"), value.pop("shape"), value.pop("dtype"), value.pop("layout"), value.pop("image_format")
    return {**value, "candidates": candidates, "model_name": "yolov4-tiny", "model_version": 1, "batch_id": "b",
            "batch_size": 1}


def cand(x1: float, y1: float, x2: float, y2: float, score: float, cls: int) -> dict[str, Any]:
    return {"x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": score, "class_id": cls}


def test_postprocess_nms_maps_back_stores_then_publishes(catalog: ModelCatalog) -> None:
    results = FakeResults()
    stage = PostprocessStage(catalog, results, SETTINGS)
    # 832x416 image -> scale 0.5, pad_x 104: input x = 104 + 0.5 * x
    cands = [cand(154, 50, 204, 100, 0.9, 16), cand(156, 52, 204, 100, 0.8, 16),  # same dog twice
             cand(154, 50, 204, 100, 0.7, 15), cand(300, 300, 310, 310, 0.3, 0)]
    (out,) = stage.process([record(inferred(catalog, cands), headers={"reply-to": b"u.detect.replies:1"})])
    assert not isinstance(out, Failure)
    result = out[0].value
    assert [d["class_name"] for d in result["detections"]] == ["dog", "cat", "person"]
    box = result["detections"][0]["box"]
    assert [box["x1"], box["y1"], box["x2"], box["y2"]] == pytest.approx([100, 100, 200, 200])
    assert result["detections"][0]["box_norm"]["x2"] == pytest.approx(200 / 416)
    assert results.saved[0]["request_id"] == "r1" and len(results.cache) == 1
    assert [o.topic for o in out] == ["u.detections", "u.detect.replies"]
    (filtered,) = stage.process([record(inferred(catalog, cands, classes=["cat"], score_threshold=0.5))])
    assert [d["class_name"] for d in filtered[0].value["detections"]] == ["cat"]  # type: ignore[index]


def test_postprocess_retries_when_cassandra_is_down(catalog: ModelCatalog) -> None:
    results = FakeResults()
    results.down = True
    stage = PostprocessStage(catalog, results, SETTINGS)
    outs = stage.process([record(inferred(catalog, [])), record(inferred(catalog, []))])
    assert all(isinstance(o, Failure) and isinstance(o.error, TransientError) for o in outs)


def test_recorder_stores_every_result_postprocess_did_not() -> None:
    results = FakeResults()
    stage = RecorderStage(results, "u.")
    assert stage.input_topics() == ["u.detections"]
    outs = stage.process([record({"request_id": "a", "tenant": "t", "status": "REJECTED"}),
                          record({"request_id": "b", "tenant": "t", "status": "OK", "cache_hit": True}),
                          record({"request_id": "c", "tenant": "t", "status": "OK", "cache_hit": False})])
    assert outs == [[], [], []]
    # c came from postprocess, which stored it before publishing it
    assert [r["request_id"] for r in results.saved] == ["a", "b"]


def test_inference_hot_loads_in_the_background_reports_and_survives_a_failed_load(catalog: ModelCatalog) -> None:
    import threading
    import time

    from model_store.serving.session import SessionError

    d = catalog.root / "yolov4-tiny" / "3"
    d.mkdir()
    for name in (CONFIG_FILE, MODEL_FILE):
        (d / name).write_bytes((catalog.root / "yolov4-tiny" / "1" / name).read_bytes())
    release = threading.Event()
    loads: list[int] = []
    base = fake_model([])

    def loader(mv: Any) -> LoadedModel:
        loads.append(mv.version)
        if mv.version == 3:
            raise SessionError("cannot open: broken graph")
        release.wait(10)
        return base(mv)

    reports: list[tuple[Any, ...]] = []
    table = RoutingTable()
    pool = ModelPool(ModelCatalog(catalog.root, table=table), loader)
    pool.add_listener(lambda e: reports.append((e.model, e.version, e.action, e.reason)))
    stage = InferenceStage(pool.catalog, SETTINGS, pool)
    routing = Routing("yolov4-tiny").pushed(1).pushed(2)
    stage.on_routing(routing)  # production 1 and the newest, 2: loaded on the loader thread
    assert pool.loaded_versions() == []  # on_routing returned while the loads wait
    release.set()
    assert stage.model("yolov4-tiny", 2).version.version == 2  # waits for the background load
    deadline = time.monotonic() + 10
    while len(pool.loaded_versions()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.loaded_versions() == [("yolov4-tiny", 1), ("yolov4-tiny", 2)]
    assert sorted(loads) == [1, 2]  # one load each, never a second one for the record that waited
    assert {(r[1], r[2]) for r in reports} == {(1, "READY"), (2, "READY")}

    stage.on_routing(routing.pushed(3))  # the newest version is broken
    while not any(r[2] == "LOAD_FAILED" for r in reports) and time.monotonic() < deadline:
        time.sleep(0.01)
    failed = [r for r in reports if r[2] == "LOAD_FAILED"]
    assert failed and failed[0][1] == 3 and "broken graph" in failed[0][3]
    assert table.unavailable("yolov4-tiny") == {3}
    assert ("yolov4-tiny", 3) not in pool.loaded_versions() and len(pool.loaded_versions()) == 2

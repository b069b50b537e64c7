# ruff: noqa: F811  (the catalog fixture is imported from test_processors and used as an argument)
"""Deletion tombstones and tenant content policies (processors/governance.py) in the stages, with fakes."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from test_processors import (  # noqa: F401  (catalog is a fixture)
    SETTINGS,
    FakeObjects,
    FakeResults,
    FakeScanner,
    cand,
    catalog,
    inferred,
    record,
    submitted,
)

from config import REVIEW_RETENTION_DAYS, GatewaySettings, SettingsError, StackSettings
from infra.stack.minio import RETENTION_TAG, UNCLAIMED_TAG, lifecycle_rules
from model_store.catalog import ModelCatalog
from processors.governance import (
    ERASED,
    IMAGE_DELETED,
    NO_POLICY,
    Policy,
    abuse_event,
    apply_policy,
    deleted_at_of,
    deleted_result,
    hidden,
    store_unless_deleted,
)
from processors.params import CacheKey, effective_params
from processors.postprocess import PostprocessStage
from processors.recorder import RecorderStage
from processors.scan import ScanStage
from stream.records import Failure, now_ms


class FakeGovernance:
    def __init__(self, tombstones: dict[tuple[str, str], int] | None = None,
                 policies: dict[str, Policy] | None = None):
        self.stones = dict(tombstones or {})
        self.policy = dict(policies or {})
        self.queries: list[int] = []  # images asked, per call

    def tombstones(self, images: Any) -> dict[tuple[str, str], int]:
        images = list(images)
        self.queries.append(len(images))
        tenants = {t for t, _ in images}
        return {k: v for k, v in self.stones.items() if k in images or (k[1] == ERASED and k[0] in tenants)}

    def policies(self, tenants: Any) -> dict[str, Policy]:
        return {t: self.policy.get(t, NO_POLICY) for t in tenants}


class ReviewObjects(FakeObjects):
    def __init__(self, objects: dict[tuple[str, str], bytes] | None = None):
        super().__init__(objects)
        self.reviewed: dict[tuple[str, str], int] = {}
        self.removed: list[tuple[str, str]] = []

    def remove(self, bucket: str, key: str) -> None:
        self.removed.append((bucket, key))
        self.objects.pop((bucket, key), None)

    def review_copy(self, dest_bucket: str, dest_key: str, *, retention_days: int, data: bytes | None = None,
                    source: tuple[str, str] | None = None) -> bool:
        if source is not None and source not in self.objects:
            return False
        self.reviewed[(dest_bucket, dest_key)] = retention_days
        return True


class SupersedingResults(FakeResults):
    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, Any]] = {}

    def save_results(self, results: Any, *, supersede: bool = False, index: bool = True, cache: Any = ()) -> None:
        super().save_results(results, cache=cache)
        for r in results:
            if supersede or r["request_id"] not in self.rows:
                self.rows[r["request_id"]] = dict(r)


class IndexingResults(FakeResults):
    def __init__(self) -> None:
        super().__init__()
        self.indexed: list[tuple[str, str, str, int | None]] = []

    def index_images(self, entries: Any) -> None:
        self.indexed += list(entries)


def det(name: str, cid: int) -> dict[str, Any]:
    box = {"x1": 0.0, "y1": 0.0, "x2": 1.0, "y2": 1.0}
    return {"class_id": cid, "class_name": name, "score": 0.9, "box": box, "box_norm": box}


# ---- the pure rules ---------------------------------------------------------------------------------


def test_a_result_is_hidden_when_its_request_was_made_before_the_deletion() -> None:
    assert not hidden(None, 10)
    assert hidden(100, 10) and hidden(100, 100) and not hidden(100, 101)
    assert hidden(100, None, 50) and not hidden(100, None, 150) and hidden(100, None, None)
    stones = {("t", "a"): 100, ("u", ERASED): 300}
    assert deleted_at_of(stones, "t", "a") == 100 and deleted_at_of(stones, "t", "b") is None
    assert deleted_at_of(stones, "u", "a") == 300 and deleted_at_of(stones, "u", None) == 300


def test_the_deleted_result_keeps_nothing_of_the_image() -> None:
    r = {"request_id": "r", "tenant": "t", "status": "OK", "detections": [det("bus", 5)], "image_width": 9,
         "image_height": 9, "image_sha256": "ab", "model_name": "m", "model_version": 1, "job_id": "j",
         "submitted_at": 5, "review": True}
    d = deleted_result(r)
    assert d["status"] == "REJECTED" and d["error_code"] == IMAGE_DELETED and d["job_id"] == "j"
    assert d["detections"] == [] and d["image_sha256"] is None and d["image_width"] is None and not d["review"]


def test_policy_hides_classes_and_flags_on_presence() -> None:
    r = {"request_id": "r", "tenant": "t", "status": "OK", "detections": [det("bus", 5), det("person", 0)]}
    assert apply_policy(r, NO_POLICY).result == r
    a = apply_policy(r, Policy(hidden_classes=frozenset({"person"}), review_classes=frozenset({"person", "cat"})))
    assert [d["class_name"] for d in a.result["detections"]] == ["bus"]
    assert a.flagged == ("person",) and a.result["review"] is True  # a hidden class still flags: it is present
    assert apply_policy({**r, "status": "REJECTED"}, Policy(hidden_classes=frozenset({"bus"}))).flagged == ()
    event = abuse_event({**a.result, "image_sha256": "ab"}, a.flagged, "review/t/ab", 90, 3)
    assert event["classes"] == ["person"] and event["retention_days"] == 90 and event["policy_revision"] == 3


def test_store_then_check_supersedes_a_result_deleted_meanwhile() -> None:
    results = SupersedingResults()
    gov = FakeGovernance({("t", "ab"): now_ms()})
    batch = [{"request_id": "old", "tenant": "t", "status": "OK", "image_sha256": "ab", "submitted_at": 1,
              "detections": [det("bus", 5)]},
             {"request_id": "new", "tenant": "t", "status": "OK", "image_sha256": "ab",
              "submitted_at": now_ms() + 60_000, "detections": [det("bus", 5)]}]
    out = store_unless_deleted(results, gov, batch)
    assert [o["status"] for o in out] == ["REJECTED", "OK"]
    assert results.rows["old"]["error_code"] == IMAGE_DELETED and results.rows["old"]["detections"] == []
    assert results.rows["new"]["status"] == "OK"
    assert gov.queries == [2]  # one batched lookup


# ---- in the stages ------------------------------------------------------------------------------------


def test_postprocess_applies_the_policy_caches_the_model_answer_and_flags(catalog: ModelCatalog) -> None:
    results = SupersedingResults()
    objects = ReviewObjects({("uploads", "t1/x"): b"img"})
    gov = FakeGovernance(policies={"t1": Policy(frozenset({"person"}), frozenset({"person"}), 90, 2)})
    stage = PostprocessStage(catalog, results, SETTINGS, gov, objects)
    value = inferred(catalog, [cand(154, 50, 204, 100, 0.9, 5), cand(300, 300, 310, 310, 0.8, 0)])
    value["context"]["source"] = {"bucket": "uploads", "key": "t1/x"}
    (out,) = stage.process([record(value)])
    assert not isinstance(out, Failure)
    result = out[0].value
    assert [d["class_name"] for d in result["detections"]] == ["bus"] and result["review"] is True
    assert sorted(d["class_name"] for d in next(iter(results.cache.values()))["detections"]) == ["bus", "person"]
    abuse = [o for o in out if o.event == "AbuseEvent"]
    assert [o.topic for o in abuse] == ["u.abuse"] and abuse[0].value["classes"] == ["person"]
    sha = value["image_sha256"]
    assert objects.reviewed == {("review", f"t1/{sha}"): 90}
    assert abuse[0].value["review_object"] == f"review/t1/{sha}"


def test_postprocess_never_publishes_a_deleted_images_result(catalog: ModelCatalog) -> None:
    results = SupersedingResults()
    value = inferred(catalog, [cand(154, 50, 204, 100, 0.9, 5)])
    gov = FakeGovernance({(value["context"]["tenant"], value["image_sha256"]): now_ms() + 1000},
                         {"t1": Policy(review_classes=frozenset({"bus"}))})
    objects = ReviewObjects()
    stage = PostprocessStage(catalog, results, SETTINGS, gov, objects)
    (out,) = stage.process([record(value, headers={"reply-to": b"u.detect.replies:1"})])
    assert not isinstance(out, Failure)
    assert {o.value["error_code"] for o in out} == {IMAGE_DELETED}  # type: ignore[union-attr]
    assert all(o.value["detections"] == [] for o in out)  # type: ignore[union-attr]
    assert [o.topic for o in out] == ["u.detections", "u.detect.replies"]  # no abuse event, no review copy
    assert objects.reviewed == {} and results.rows["r1"]["error_code"] == IMAGE_DELETED


def test_recorder_stores_a_deleted_images_result_as_image_deleted() -> None:
    results = SupersedingResults()
    gov = FakeGovernance({("t", ERASED): now_ms() + 1000})
    stage = RecorderStage(results, "u.", governance=gov)
    outs = stage.process([record({"request_id": "a", "tenant": "t", "status": "OK", "cache_hit": True,
                                  "image_sha256": "ab", "submitted_at": now_ms(), "detections": [det("bus", 5)]})])
    assert outs == [[]] and results.rows["a"]["error_code"] == IMAGE_DELETED


def test_scan_cancels_a_deleted_image_and_removes_its_upload(catalog: ModelCatalog) -> None:
    sha = hashlib.sha256(b"img").hexdigest()
    objects = ReviewObjects({("uploads", "t1/uploads/u1"): b"img"})
    gov = FakeGovernance({("t1", sha): now_ms() + 1000})
    scanner = FakeScanner()
    results = IndexingResults()
    stage = ScanStage(objects, scanner, catalog, results, SETTINGS, gov)
    (out,) = stage.process([record(submitted({"bucket": "uploads", "key": "t1/uploads/u1"}, lane="BATCH",
                                             job_id="j1"), lane="batch")])
    assert not isinstance(out, Failure)
    assert [o.event for o in out] == ["DetectionResult"]
    assert out[0].value["error_code"] == IMAGE_DELETED and out[0].value["job_id"] == "j1"  # type: ignore[index]
    assert objects.removed == [("uploads", "t1/uploads/u1")]
    assert [e[:3] for e in results.indexed] == [("t1", sha, "r1")]  # indexed before the check
    assert gov.queries == [1]


def test_scan_applies_the_policy_to_cache_hits(catalog: ModelCatalog) -> None:
    results = IndexingResults()
    sha = hashlib.sha256(b"img").hexdigest()
    key = CacheKey("t1", sha, "yolov4-tiny", 2, effective_params({}, SETTINGS).digest())
    results.cache[key] = {"request_id": "old", "tenant": "t1", "status": "OK", "image_sha256": sha,
                          "detections": [det("bus", 5), det("person", 0)], "model_version": 2, "submitted_at": 1}
    objects = ReviewObjects()
    gov = FakeGovernance(policies={"t1": Policy(frozenset({"person"}), frozenset({"bus"}))})
    stage = ScanStage(objects, FakeScanner(), catalog, results, SETTINGS, gov)
    (out,) = stage.process([record(submitted({"data": b"img"}, request_id="new"))])
    assert not isinstance(out, Failure)
    hit = out[0].value
    assert hit["cache_hit"] and [d["class_name"] for d in hit["detections"]] == ["bus"]  # type: ignore[index]
    assert hit["review"] is True and hit["submitted_at"] != 1  # type: ignore[index]
    assert [o.event for o in out] == ["DetectionResult", "AbuseEvent"]
    assert objects.reviewed == {("review", f"t1/{sha}"): SETTINGS.review_retention_days}


# ---- retention settings and lifecycle rules ---------------------------------------------------------


def test_lifecycle_rules_expire_uploads_quarantine_unclaimed_uploads_and_review_copies() -> None:
    stack = StackSettings.from_env({}).replace(uploads_retention_days=3, quarantine_retention_days=20,
                    unclaimed_upload_days=2)
    rules = lifecycle_rules(stack)
    days = {b: {r.rule_id: r.expiration.days for r in rs} for b, rs in rules.items()}
    assert days["uploads"] == {"detectflow-uploads-retention": 3, "detectflow-unclaimed-uploads": 2}
    assert days["quarantine"] == {"detectflow-quarantine-retention": 20}
    assert days["review"]["detectflow-review-retention"] == max(REVIEW_RETENTION_DAYS)
    tagged = {r.rule_filter.tag.key: r.rule_filter.tag.value for r in rules["uploads"] if r.rule_filter.tag}
    assert tagged == {UNCLAIMED_TAG[0]: UNCLAIMED_TAG[1]}
    assert {(r.rule_filter.tag.value, r.expiration.days) for r in rules["review"] if r.rule_filter.tag
            and r.rule_filter.tag.key == RETENTION_TAG} == {(str(d), d) for d in REVIEW_RETENTION_DAYS}


@pytest.mark.parametrize(("env", "message"), [
    ({"DETECTFLOW_UPLOADS_RETENTION_DAYS": "0"}, "UPLOADS_RETENTION_DAYS"),
    ({"DETECTFLOW_QUARANTINE_RETENTION_DAYS": "1.5"}, "QUARANTINE_RETENTION_DAYS"),
    ({"DETECTFLOW_RAW_RETENTION_HOURS": "0"}, "RAW_RETENTION_HOURS"),
    ({"DETECTFLOW_REVIEW_RETENTION_DAYS": "12"}, "REVIEW_RETENTION_DAYS"),
    ({"DETECTFLOW_UPLOAD_URL_TTL_S": "86000"}, "UPLOAD_URL_TTL_S"),
])
def test_retention_settings_are_refused_when_out_of_bounds(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        GatewaySettings.from_env({"DETECTFLOW_AUTH_DEV": "true", **env})


def test_retention_defaults() -> None:
    gw = GatewaySettings.from_env({"DETECTFLOW_AUTH_DEV": "true"})
    assert gw.pipeline.stream.raw_retention_hours == 6.0 and gw.pipeline.review_retention_days == 30
    stack = StackSettings.from_env({})
    assert (stack.uploads_retention_days, stack.quarantine_retention_days, stack.unclaimed_upload_days) == (7, 30, 1)

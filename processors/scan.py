"""scan: ImageSubmitted -> ImageScanned, after clamd has passed the exact bytes that go on.

Per record: fetch the object (tenant prefix and bucket checked) or take the inline bytes; size cap;
sha256; resolve the model version; answer from the result cache when the same tenant already has a
result for these bytes, model version and params; otherwise scan with clamd (INSTREAM). Infected:
the object is moved to the quarantine bucket and the request closes REJECTED VIRUS_DETECTED.
clamd unreachable: TransientError, so the runtime backs off and retries; nothing unscanned goes on.

After the batch (processors/governance.py): the batch's requests are indexed by image
(image_requests), then the tombstones are read fresh (one query per tenant per 8 images): a request of
an image deleted after it was submitted ends REJECTED IMAGE_DELETED (its upload removed) before
preprocess and the model run. Index first, check second: a deletion either is seen here or finds the
request in the index and removes its upload and rows itself; cache hits get the tenant's
content policy applied here, as postprocess applies it to fresh results (the cache is served before it).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

from config import PipelineSettings
from model_store.serving.catalog import ModelCatalog, ModelNotFound
from processors import metrics as PM
from processors.governance import IMAGE_DELETED, apply_policy, deleted_at_of, deleted_result, hidden
from processors.params import CacheKey, effective_params
from processors.postprocess import Governance, flag_for_review
from processors.scanner import ScanVerdict
from schemas import events
from stream import ingest
from stream.errors import InvalidRecord, TransientError
from stream.records import Failure, Outcome, Output, Record, now_ms, per_record, result_outputs, terminal_result
from stream.serde import epoch_ms
from stream.topics import LANES, ingest_pattern, lane_topic, tenant_of_ingest

log = logging.getLogger(__name__)
# After a failed result-cache lookup, the next ones are skipped (a miss) for this long. Each lookup waits its
# query timeout (10 s) while Cassandra is paused: scan ran one record per 10 s through the drill's 98 s pause.
CACHE_BREAK_S = 10.0


class Objects(Protocol):
    def get(self, bucket: str, key: str, max_bytes: int) -> bytes: ...
    def quarantine(self, dest_bucket: str, dest_key: str, *, data: bytes | None = None,
                   source: tuple[str, str] | None = None, metadata: dict[str, Any] | None = None) -> None: ...
    def remove(self, bucket: str, key: str) -> None: ...
    def review_copy(self, dest_bucket: str, dest_key: str, *, retention_days: int, data: bytes | None = None,
                    source: tuple[str, str] | None = None) -> bool: ...


class Scanner(Protocol):
    name: str

    def scan(self, data: bytes) -> ScanVerdict: ...


class Cache(Protocol):
    def cache_get(self, key: CacheKey) -> dict[str, Any] | None: ...
    def index_images(self, entries: list[tuple[str, str, str, int | None]]) -> None: ...


def stored_object(image: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The object holding the submitted bytes: the image itself when it is a reference, else where the inline
    bytes are also stored (the gateway's sync uploads), else None."""
    if "data" not in image:
        return image
    stored: Mapping[str, Any] | None = image.get("stored")
    return stored


def _check_tenant_object(obj: Mapping[str, Any], tenant: str, settings: PipelineSettings) -> None:
    bucket, key = obj["bucket"], obj["key"]
    if bucket != settings.uploads_bucket or not key.startswith(f"{tenant}/") or ".." in key.split("/"):
        # Tenant isolation: a submission can only name its own tenant's uploads.
        raise InvalidRecord("FORBIDDEN_OBJECT", f"{bucket}/{key} is not in this tenant's uploads")


def image_bytes(image: Mapping[str, Any], tenant: str, objects: Objects, settings: PipelineSettings) -> bytes:
    """The submitted image's bytes: inline, or fetched. Any object named (fetched, or where inline bytes are
    stored) must be in the uploads bucket under the tenant's own prefix."""
    obj = stored_object(image)
    if obj is not None:
        _check_tenant_object(obj, tenant, settings)
    if "data" in image:
        data = bytes(image["data"])
        if len(data) > settings.image_max_bytes:
            raise InvalidRecord("IMAGE_TOO_LARGE", f"{len(data)} bytes, the limit is {settings.image_max_bytes}")
        if len(data) > settings.inline_max_bytes and obj is None:
            # The pipeline carries at most inline_max_bytes inline (ImageScanned has no room for more): a larger
            # image goes by reference (an object in the tenant's uploads), as the project's clients send it.
            raise InvalidRecord("IMAGE_TOO_LARGE", f"an inline image of {len(data)} bytes is over the inline limit "
                                f"of {settings.inline_max_bytes}: upload it and submit an object reference")
        return data
    return objects.get(image["bucket"], image["key"], settings.image_max_bytes)


def verdict_result(value: Mapping[str, Any], lane: str, sha256: str, signature: str) -> dict[str, Any]:
    result = terminal_result(key=value["request_id"], value=value, lane=lane, status="REJECTED",
                             code="VIRUS_DETECTED", message=f"malware found: {signature}")
    result["image_sha256"] = sha256
    return result


def cached_result(cached: Mapping[str, Any], value: Mapping[str, Any], lane: str, waited_ms: float) -> dict[str, Any]:
    """A cache entry re-issued for this request: the outcome, detections, image and model of the entry, this
    request's ids."""
    return events.detection_result(
        request_id=value["request_id"], tenant=value["tenant"], status=cached.get("status") or "FAILED",
        detections=cached.get("detections") or (), image_width=cached.get("image_width"),
        image_height=cached.get("image_height"), image_sha256=cached.get("image_sha256"),
        model_name=cached.get("model_name"), model_version=cached.get("model_version"),
        timings_ms={"cache_lookup": waited_ms}, error_code=cached.get("error_code"),
        error_message=cached.get("error_message"), job_id=value.get("job_id"), lane=lane.upper(), cache_hit=True,
        submitted_at=epoch_ms(value.get("submitted_at")), review=False, completed_at=now_ms())


class ScanStage:
    name = "scan"
    input_event = "ImageSubmitted"
    emits_terminal_results = True

    def __init__(self, objects: Objects, scanner: Scanner, catalog: ModelCatalog, cache: Cache | None,
                 settings: PipelineSettings, governance: Governance | None = None):
        self.objects = objects
        self.scanner = scanner
        self.catalog = catalog
        self.cache = cache
        self.settings = settings
        self.governance = governance
        self.prefix = settings.stream.topic_prefix
        self._hit_bytes: dict[str, bytes] = {}  # this batch's inline bytes of cache hits (for a review copy)
        self._cache_broken_until = 0.0  # time.monotonic(): lookups are skipped until then (CACHE_BREAK_S)

    def input_topics(self) -> list[str]:
        return [lane_topic(self.prefix, lane, "submitted") for lane in LANES]

    def input_patterns(self) -> list[str]:
        # Every tenant's ingest topic (stream/ingest.py): what systems producing into Kafka write.
        return [ingest_pattern(self.prefix)]

    def process(self, batch: list[Record]) -> list[Outcome]:
        self._hit_bytes.clear()
        outcomes = per_record(batch, self._one)
        if self.governance is None:
            return outcomes
        try:
            return self._govern(batch, outcomes)
        except TransientError as exc:
            return [Failure(exc) for _ in batch]
        finally:
            self._hit_bytes.clear()

    def _govern(self, batch: list[Record], outcomes: list[Outcome]) -> list[Outcome]:
        """Cancel the requests of deleted images; apply the tenant's policy to cache hits."""
        assert self.governance is not None
        subjects: list[tuple[int, dict[str, Any], bool]] = []  # (index, tenant/sha/submitted_at, cache hit)
        for i, out in enumerate(outcomes):
            if isinstance(out, Failure) or not out:
                continue
            first = out[0]
            if first.event == "ImageScanned" and isinstance(first.value, dict):
                ctx = first.value["context"]
                subjects.append((i, {"tenant": ctx["tenant"], "sha": first.value["sha256"],
                                     "submitted_at": ctx.get("submitted_at")}, False))
            elif first.event == "DetectionResult" and isinstance(first.value, dict) and first.value.get("cache_hit"):
                v = first.value
                subjects.append((i, {"tenant": v["tenant"], "sha": v.get("image_sha256"),
                                     "submitted_at": v.get("submitted_at")}, True))
        if not subjects:
            return outcomes
        if self.cache is not None:
            self.cache.index_images([(s["tenant"], s["sha"], batch[i].value["request_id"],
                                      epoch_ms(s["submitted_at"])) for i, s, _ in subjects if s["sha"]])
        stones = self.governance.tombstones([(s["tenant"], s["sha"]) for _, s, _ in subjects])
        hits = {s["tenant"] for _, s, hit in subjects if hit}
        policies = self.governance.policies(hits) if hits else {}
        for i, s, hit in subjects:
            rec = batch[i]
            carried = dict(rec.headers)
            if hidden(deleted_at_of(stones, s["tenant"], s["sha"]), epoch_ms(s["submitted_at"])):
                image = rec.value["image"]
                # Only a pipeline principal's record names where its inline bytes are stored (see _one).
                obj = image if "data" not in image else (
                    None if tenant_of_ingest(self.prefix, rec.topic) is not None else image.get("stored"))
                if obj is not None and obj.get("bucket") == self.settings.uploads_bucket:
                    self.objects.remove(obj["bucket"], obj["key"])  # the upload of a deleted image
                result = deleted_result(terminal_result(key=rec.key, value=rec.value, lane=rec.lane,
                                                        status="REJECTED", code=IMAGE_DELETED, message=""))
                PM.DELETED_DROPPED.labels(self.name).inc()
                outcomes[i] = result_outputs(self.prefix, result, carried)
            elif hit:
                first = outcomes[i][0]  # type: ignore[index]
                policy = policies[s["tenant"]]
                applied = apply_policy(first.value, policy)  # type: ignore[arg-type]
                extra = [flag_for_review(applied.result, applied.flagged, policy, self.objects, self.settings,
                                         data=self._hit_bytes.get(rec.value["request_id"]),
                                         source=rec.value["image"])] if applied.flagged else []
                outcomes[i] = result_outputs(self.prefix, applied.result, carried) + extra
        return outcomes

    def _one(self, rec: Record) -> list[Output]:
        value = rec.value
        bound = ingest.check(self.prefix, rec)
        if bound.mismatch:
            PM.TENANT_MISMATCH.inc()
            return ingest.mismatch_outputs(self.prefix, rec, bound)
        if bound.tenant is not None:  # the topic's tenant and lane travel on, whatever the record said
            value = ingest.stamped(value, bound.tenant, rec.lane)
            if value["image"].get("stored") is not None:  # a tenant's record names no object for us to act on
                value = {**value, "image": {**value["image"], "stored": None}}
        tenant = value["tenant"]
        t0 = time.perf_counter()
        data = image_bytes(value["image"], tenant, self.objects, self.settings)
        if not data:
            raise InvalidRecord("EMPTY_IMAGE", "the image has no bytes")
        sha256 = hashlib.sha256(data).hexdigest()
        claimed = value["image"].get("sha256")
        if claimed and claimed.lower() != sha256:
            raise InvalidRecord("CHECKSUM_MISMATCH", f"image sha256 is {sha256}, the submission says {claimed}")
        t_fetch = time.perf_counter()
        try:
            model = self.catalog.resolve(value["model"]["name"], value["model"].get("version"), value["request_id"])
        except ModelNotFound as exc:
            raise InvalidRecord("MODEL_NOT_FOUND", str(exc)) from exc
        PM.ROUTED.labels(model.name, str(model.version), self._route_role(value["model"], model.version)).inc()
        params = effective_params(value.get("params"), self.settings, model.config.class_names)
        carried = dict(rec.headers)

        if self.cache is not None:
            key = CacheKey(tenant, sha256, model.name, model.version, params.digest())
            cached = self._cache_lookup(key)
            if cached is not None:
                PM.CACHE.labels("hit").inc()
                if "data" in value["image"]:
                    self._hit_bytes[value["request_id"]] = data
                return result_outputs(self.prefix, cached_result(cached, value, rec.lane,
                                                                 (time.perf_counter() - t_fetch) * 1000), carried)
            PM.CACHE.labels("miss").inc()

        t_scan = time.perf_counter()
        verdict = self.scanner.scan(data)
        t_done = time.perf_counter()
        if not verdict.clean:
            self._quarantine(value, tenant, sha256, data, verdict.signature or "unknown")
            PM.INFECTED.inc()
            return result_outputs(self.prefix, verdict_result(value, rec.lane, sha256, verdict.signature or ""),
                                  carried)

        image = value["image"]
        obj = stored_object(image)
        source = None if obj is None else events.object_ref(
            bucket=obj["bucket"], key=obj["key"], sha256=obj.get("sha256"), size=obj.get("size"),
            content_type=obj.get("content_type"))
        if len(data) <= self.settings.inline_max_bytes:
            forwarded = events.inline_image(data=data, sha256=sha256, content_type=image.get("content_type"))
        else:
            forwarded = {**(source or {}), "sha256": sha256, "size": len(data)}
        context = events.request_context(
            request_id=value["request_id"], tenant=tenant, lane=value["lane"],
            model=events.model_selector(name=model.name, version=model.version), params=value.get("params") or {},
            deadline_ms=value.get("deadline_ms"), job_id=value.get("job_id"), submitted_at=value["submitted_at"],
            source=source)
        scanned = events.image_scanned(
            context=context, image=forwarded, sha256=sha256, size=len(data), scanner=self.scanner.name,
            timings_ms={"fetch": (t_fetch - t0) * 1000, "cache_lookup": (t_scan - t_fetch) * 1000,
                        "scan": (t_done - t_scan) * 1000})
        return [Output(lane_topic(self.prefix, rec.lane, "scanned"), value["request_id"], scanned, "ImageScanned")]

    def _route_role(self, selector: dict[str, Any], version: int) -> str:
        if selector.get("version") is not None:
            return "pinned"
        routing = self.catalog.table.routing(selector["name"]) if self.catalog.table is not None else None
        return "canary" if routing is not None and routing.canary == version else "production"

    def _cache_lookup(self, key: CacheKey) -> dict[str, Any] | None:
        assert self.cache is not None
        if time.monotonic() < self._cache_broken_until:
            PM.CACHE.labels("skipped").inc()
            return None
        try:
            return self.cache.cache_get(key)
        except TransientError as exc:
            # The cache is an optimisation: when Cassandra is away, run the model instead of waiting, and do not
            # wait on the next lookups either for a while.
            PM.CACHE.labels("error").inc()
            self._cache_broken_until = time.monotonic() + CACHE_BREAK_S
            log.warning("result cache unavailable, treating as a miss (lookups skipped for %.0f s): %s",
                        CACHE_BREAK_S, exc)
            return None

    def _quarantine(self, value: Mapping[str, Any], tenant: str, sha256: str, data: bytes, signature: str) -> None:
        obj = stored_object(value["image"])
        meta = {"detectflow-signature": signature[:200], "detectflow-request-id": value["request_id"]}
        source = None if obj is None else (obj["bucket"], obj["key"])  # moved server-side, out of uploads
        self.objects.quarantine(self.settings.quarantine_bucket, f"{tenant}/{sha256}",
                                data=data if source is None else None, source=source, metadata=meta)

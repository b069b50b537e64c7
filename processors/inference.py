"""inference: ImagePreprocessed -> InferenceOutput, micro-batched, one ONNX Runtime session per version.

The runtime hands this stage a micro-batch (it leaves the topic partitions when it has
``inference_max_batch`` records or its oldest record has waited the lane's queue delay). Here:
records past their deadline are closed FAILED DEADLINE_EXCEEDED before the model runs; the rest are
grouped by model version, stacked into one input per chunk of the version's batch limit, run, and
decoded by the version's decoder family; only candidates at or above each request's score threshold
leave, best first and bounded, to keep records small.

Hot reload: the stage listens to the registry (``on_routing``, called by the model watcher). Versions
that will take traffic (production, canary, the previous production for an instant rollback, the newest pushed) are
loaded and warmed up on a background thread while the current ones keep serving, then reported READY
on `models`; a version that fails to load is reported LOAD_FAILED, routed around, and the old one
keeps serving. A record for a version still loading waits for that load (never a second one). At
most ``max_loaded_versions`` sessions stay loaded; the least recently used unneeded one goes first.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import numpy as np

from config import PipelineSettings
from model_store.catalog import ModelCatalog, ModelNotFound, ModelVersion
from model_store.decoders import DecoderError, decode_outputs
from model_store.detect import Candidates, to_model_input
from model_store.routing import Routing
from model_store.session import SessionError, SessionSettings, create_session
from processors import metrics as PM
from processors.params import effective_params
from processors.tensor_encoding import model_input
from schemas import events
from stream.errors import InvalidRecord, TransientError
from stream.records import Failure, Outcome, Output, Record, now_ms, result_outputs, terminal_result
from stream.serde import epoch_ms
from stream.topics import LANES, lane_topic

log = logging.getLogger(__name__)

Reporter = Callable[[str, int, str, "str | None"], None]  # (model, version, READY|LOAD_FAILED, reason)
LOAD_WAIT_S = 120.0


@dataclass
class LoadedModel:
    """A model version ready to serve: its session, warmed up."""

    version: ModelVersion
    run: Callable[[np.ndarray], dict[str, np.ndarray]]  # float32 NCHW batch -> outputs by name
    providers: Sequence[str]


def load_onnx(mv: ModelVersion, threads: int) -> LoadedModel:
    """Open the version's session on the best usable providers and warm it up (first runs plan and allocate)."""
    spec = mv.config.input
    session, providers = create_session(mv.model_file, SessionSettings(intra_op_threads=threads),
                                        max_batch=mv.config.max_batch,
                                        input_shape=(spec.name, 3, spec.height, spec.width))
    names = [o.name for o in session.get_outputs()]

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, {spec.name: batch}), strict=True))

    for n in (1, 2):
        run(np.zeros((n, 3, spec.height, spec.width), dtype=np.float32))
    return LoadedModel(mv, run, providers)


def tensor_of(value: dict[str, Any], mv: ModelVersion) -> np.ndarray:
    """The record's letterboxed uint8 [3, H, W] tensor (either encoding, padded with this version's pad value),
    checked against the version's input contract: what does not fit is InvalidRecord INVALID_TENSOR."""
    return model_input(value, mv.config.input)


def candidate_dicts(c: Candidates, threshold: float, limit: int) -> list[dict[str, Any]]:
    keep = np.nonzero(c.scores >= threshold)[0]
    keep = keep[np.argsort(-c.scores[keep], kind="stable")][:limit]
    return [events.candidate(x1=float(b[0]), y1=float(b[1]), x2=float(b[2]), y2=float(b[3]), score=float(s),
                             class_id=int(k))
            for b, s, k in zip(c.boxes[keep], c.scores[keep], c.class_ids[keep], strict=True)]


class InferenceStage:
    name = "inference"
    input_event = "ImagePreprocessed"
    emits_terminal_results = True

    def __init__(self, catalog: ModelCatalog, settings: PipelineSettings,
                 loader: Callable[[ModelVersion], LoadedModel] | None = None,
                 clock: Callable[[], int] = now_ms, reporter: Reporter | None = None):
        self.catalog = catalog
        self.settings = settings
        self.prefix = settings.stream.topic_prefix
        self._loader = loader or (lambda mv: load_onnx(mv, settings.intra_op_threads))
        self._models: dict[tuple[str, int], LoadedModel] = {}
        self._loading: dict[tuple[str, int], Future[LoadedModel]] = {}
        self._last_used: dict[tuple[str, int], float] = {}
        self._wanted: dict[str, set[int]] = {}
        self._lock = threading.Lock()
        # One background load at a time: loading competes with serving for the same cores.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load")
        self._report = reporter
        self.clock = clock

    def input_topics(self) -> list[str]:
        return [lane_topic(self.prefix, lane, "preprocessed") for lane in LANES]

    # ---- models ---------------------------------------------------------------------------------
    def warm_up(self, name: str | None = None) -> LoadedModel | None:
        """Load the production version of ``name`` (default model) before consuming; None while the registry
        has no production version of it (requests for it are refused upstream until one is promoted)."""
        try:
            mv = self.catalog.resolve(name or self.settings.default_model)
        except ModelNotFound as exc:
            log.warning("inference: nothing to warm up: %s", exc)
            return None
        return self.model(mv.name, mv.version)

    def model(self, name: str, version: int) -> LoadedModel:
        """The loaded version; loads it here if no background load is under way, else waits for that one."""
        key = (name, version)
        with self._lock:
            loaded = self._models.get(key)
            pending = self._loading.get(key)
            if loaded is not None:
                self._last_used[key] = time.monotonic()
                return loaded
        if pending is not None:
            try:
                return pending.result(timeout=LOAD_WAIT_S)
            except FutureTimeout as exc:
                raise TransientError(f"model {name} v{version} still loading after {LOAD_WAIT_S:.0f}s") from exc
        return self._load(key)

    def _load(self, key: tuple[str, int]) -> LoadedModel:
        name, version = key
        try:
            mv = self.catalog.get(name, version)
        except ModelNotFound as exc:
            raise InvalidRecord("MODEL_NOT_FOUND", str(exc)) from exc
        t0 = time.perf_counter()
        try:
            loaded = self._loader(mv)
        except SessionError as exc:
            self._reported(name, version, "LOAD_FAILED", str(exc)[:500])
            raise TransientError(f"model {name} v{version} failed to load: {exc}") from exc
        log.info("model %s v%s ready on %s in %.1fs", name, version, loaded.providers[0], time.perf_counter() - t0)
        PM.MODEL_READY.labels(name, str(version), loaded.providers[0]).set(1)
        with self._lock:
            self._models[key] = loaded
            self._last_used[key] = time.monotonic()
        self._reported(name, version, "READY", f"on {loaded.providers[0]} in {time.perf_counter() - t0:.1f}s")
        self._evict()
        return loaded

    def _reported(self, name: str, version: int, action: str, reason: str | None) -> None:
        if action == "LOAD_FAILED":
            PM.MODEL_LOAD_FAILURES.labels(name, str(version)).inc()
            log.error("model %s v%s failed to load; the versions already loaded keep serving: %s", name, version,
                      reason)
        if self.catalog.table is not None:
            self.catalog.table.mark_failed(name, version, action == "LOAD_FAILED")
        if self._report is not None:
            self._report(name, version, action, reason)

    # ---- following the registry ------------------------------------------------------------------------
    def on_routing(self, routing: Routing) -> None:
        """The registry changed: load what will take traffic, in the background (the watcher's thread)."""
        # Production, the canary, the previous production (an instant rollback) and the newest pushed
        # version (the likely next canary: READY before anyone routes to it).
        newest = max(routing.versions, default=None)
        wanted = {v for v in (routing.production, routing.canary, *routing.previous[:1], newest) if v is not None}
        with self._lock:
            self._wanted[routing.model] = wanted
            todo = [(routing.model, v) for v in sorted(wanted, reverse=True)
                    if (routing.model, v) not in self._models and (routing.model, v) not in self._loading]
            for key in todo:
                future = self._pool.submit(self._background_load, key)
                self._loading[key] = future
        self._evict()

    def _background_load(self, key: tuple[str, int]) -> LoadedModel:
        try:
            return self._load(key)
        except (InvalidRecord, TransientError) as exc:
            if not isinstance(exc, TransientError) or "failed to load" not in str(exc):
                self._reported(key[0], key[1], "LOAD_FAILED", str(exc)[:500])
            raise
        finally:
            with self._lock:
                self._loading.pop(key, None)

    def _evict(self) -> None:
        limit = max(1, self.settings.lifecycle.max_loaded_versions)
        with self._lock:
            if len(self._models) <= limit:
                return
            unneeded = sorted((k for k in self._models if k[1] not in self._wanted.get(k[0], set())),
                              key=lambda k: self._last_used.get(k, 0.0))
            for key in unneeded[: len(self._models) - limit]:
                PM.MODEL_READY.labels(key[0], str(key[1]), self._models.pop(key).providers[0]).set(0)
                self._last_used.pop(key, None)
                log.info("model %s v%s unloaded (not needed, least recently used)", *key)

    def loaded_versions(self) -> list[tuple[str, int]]:
        with self._lock:
            return sorted(self._models)

    # ---- records ----------------------------------------------------------------------------------
    def process(self, batch: list[Record]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(batch)
        groups: dict[tuple[str, int], list[int]] = {}
        now = self.clock()
        for i, rec in enumerate(batch):
            ctx = rec.value["context"]
            deadline = epoch_ms(ctx.get("deadline_ms"))
            if deadline is not None and deadline <= now:
                PM.DEADLINE_DROPS.labels(self.name).inc()
                result = terminal_result(key=rec.key, value=rec.value, lane=rec.lane, status="FAILED",
                                         code="DEADLINE_EXCEEDED",
                                         message=f"deadline passed {now - deadline} ms before inference")
                outcomes[i] = result_outputs(self.prefix, result, dict(rec.headers))
                continue
            try:
                key = (ctx["model"]["name"], int(ctx["model"]["version"]))
            except (TypeError, ValueError):
                outcomes[i] = Failure(InvalidRecord("MODEL_NOT_FOUND", "the record names no model version"))
                continue
            groups.setdefault(key, []).append(i)
        for (name, version), idx in groups.items():
            try:
                loaded = self.model(name, version)
            except (InvalidRecord, TransientError) as exc:
                for i in idx:
                    outcomes[i] = Failure(exc)
                continue
            limit = max(1, min(self.settings.inference_max_batch, loaded.version.config.max_batch))
            for start in range(0, len(idx), limit):
                for i, outcome in self._run_chunk(loaded, [(i, batch[i]) for i in idx[start:start + limit]]):
                    outcomes[i] = outcome
        assert all(o is not None for o in outcomes)
        return [o for o in outcomes if o is not None]

    def _run_chunk(self, loaded: LoadedModel, chunk: list[tuple[int, Record]]) -> list[tuple[int, Outcome]]:
        mv = loaded.version
        done: list[tuple[int, Outcome]] = []
        ready: list[tuple[int, Record, np.ndarray, float]] = []
        for i, rec in chunk:
            try:
                tensor = tensor_of(rec.value, mv)
                threshold = effective_params(rec.value["context"].get("params"), self.settings).score_threshold
            except InvalidRecord as exc:
                done.append((i, Failure(exc)))
                continue
            ready.append((i, rec, tensor, threshold))
        if not ready:
            return done
        t0 = time.perf_counter()
        batch = to_model_input([t for _, _, t, _ in ready], mv.config.input.scale)
        outputs = loaded.run(batch)
        t1 = time.perf_counter()
        floor = min(th for _, _, _, th in ready)
        try:
            decoded = decode_outputs(outputs, mv.config, floor, self.settings.max_candidates)
        except DecoderError as exc:
            # The model broke its decoder family's contract: a bug in the model, not in the records.
            raise RuntimeError(f"model {mv.name} v{mv.version} output does not fit its decoder: {exc}") from exc
        t2 = time.perf_counter()
        n = len(ready)
        labels = (mv.name, str(mv.version))
        PM.INFERENCE_BATCH.labels(*labels).observe(n)
        PM.INFERENCE_SECONDS.labels(*labels).observe(t1 - t0)
        batch_id = uuid.uuid4().hex[:16]
        for (i, rec, _t, threshold), cands in zip(ready, decoded, strict=True):
            value = rec.value
            event = events.inference_output(
                context=value["context"], candidates=candidate_dicts(cands, threshold, self.settings.max_candidates),
                model_name=mv.name, model_version=mv.version, batch_id=batch_id, batch_size=n,
                image_sha256=value["image_sha256"], original_width=value["original_width"],
                original_height=value["original_height"], exif_orientation=value.get("exif_orientation", 1),
                letterbox=value["letterbox"],
                timings_ms={**value.get("timings_ms", {}), "inference": (t1 - t0) * 1000 / n,
                            "inference_batch": (t1 - t0) * 1000, "candidates": (t2 - t1) * 1000 / n})
            done.append((i, [Output(lane_topic(self.prefix, rec.lane, "inferred"), value["context"]["request_id"],
                                    event, "InferenceOutput")]))
        return done

"""inference: ImagePreprocessed -> InferenceOutput, micro-batched, one ONNX Runtime session per version.

The runtime hands this stage a micro-batch (it leaves the topic partitions when it has
``inference_max_batch`` records or its oldest record has waited the lane's queue delay). Here:
records past their deadline are closed FAILED DEADLINE_EXCEEDED before the model runs; the rest are
grouped by model version, stacked into one input per chunk of the version's batch limit, run, and
decoded by the version's decoder family; only candidates at or above each request's score threshold
leave, best first and bounded, to keep records small.

Hot reload: the stage follows the registry (``on_routing``, a listener on the model watcher) and tells its
``ModelPool`` (model_store/serving/pool.py) which versions will take traffic (production, canary, the previous
production for an instant rollback, the newest pushed). The pool loads and warms them up on a background thread
while the current ones keep serving, reports READY or LOAD_FAILED to its listeners (``pool_metrics`` here, the
role's reports on `models`), and unloads the least recently used unneeded version past ``max_loaded_versions``.
A version that fails to load is routed around and the old one keeps serving; a record for a version still
loading waits for that load (never a second one).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from config import PipelineSettings
from imaging.letterbox import to_model_input
from model_store.serving.boxes import Candidates
from model_store.serving.catalog import ModelCatalog, ModelNotFound, ModelVersion
from model_store.serving.decoders import DecoderError, decode_outputs
from model_store.serving.pool import (
    LOAD_FAILED,
    READY,
    UNLOADED,
    LoadedModel,
    LoadFailed,
    ModelPool,
    PoolEvent,
    StillLoading,
    load_onnx,
)
from model_store.serving.routing import Routing
from processors import metrics as PM
from processors.params import effective_params
from processors.tensor_encoding import model_input
from schemas import events
from stream.errors import InvalidRecord, TransientError
from stream.records import Failure, Outcome, Output, Record, now_ms, result_outputs, terminal_result
from stream.serde import epoch_ms
from stream.topics import LANES, lane_topic

log = logging.getLogger(__name__)


def model_pool(catalog: ModelCatalog, settings: PipelineSettings) -> ModelPool:
    """The pool a stage serves from: ONNX Runtime sessions on ``intra_op_threads``, at most ``max_loaded_versions``
    loaded, its READY/LOAD_FAILED/UNLOADED events on the metrics."""
    pool = ModelPool(catalog, lambda mv: load_onnx(mv, settings.intra_op_threads, settings.inference_max_batch),
                     max_loaded=settings.lifecycle.max_loaded_versions)
    pool.add_listener(pool_metrics)
    return pool


def pool_metrics(event: PoolEvent) -> None:
    labels = (event.model, str(event.version))
    if event.action == READY:
        PM.MODEL_READY.labels(*labels, event.provider).set(1)
    elif event.action == UNLOADED:
        PM.MODEL_READY.labels(*labels, event.provider).set(0)
    elif event.action == LOAD_FAILED:
        PM.MODEL_LOAD_FAILURES.labels(*labels).inc()


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

    def __init__(self, catalog: ModelCatalog, settings: PipelineSettings, pool: ModelPool | None = None,
                 clock: Callable[[], int] = now_ms):
        self.catalog = catalog
        self.settings = settings
        self.prefix = settings.stream.topic_prefix
        self.pool = pool or model_pool(catalog, settings)
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
        """The pool's loaded version, its errors mapped to a record's failure paths: a version that does not exist
        is the record's fault (MODEL_NOT_FOUND), one that did not load (yet) is transient."""
        try:
            return self.pool.get(name, version)
        except ModelNotFound as exc:
            raise InvalidRecord("MODEL_NOT_FOUND", str(exc)) from exc
        except (LoadFailed, StillLoading) as exc:
            raise TransientError(str(exc)) from exc

    def on_routing(self, routing: Routing) -> None:
        """The registry changed (a model watcher listener): what will take traffic is loaded in the background."""
        # Production, the canary, the previous production (an instant rollback) and the newest pushed
        # version (the likely next canary: READY before anyone routes to it).
        newest = max(routing.versions, default=None)
        wanted = {v for v in (routing.production, routing.canary, *routing.previous[:1], newest) if v is not None}
        self.pool.want(routing.model, wanted)

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
                for i, outcome in self.run_chunk(loaded, [(i, batch[i]) for i in idx[start:start + limit]]):
                    outcomes[i] = outcome
        assert all(o is not None for o in outcomes)
        return [o for o in outcomes if o is not None]

    def run_chunk(self, loaded: LoadedModel, chunk: list[tuple[int, Record]]) -> list[tuple[int, Outcome]]:
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

"""shadow: the shadow version of a model runs on the same preprocessed records, beside production.

Its own consumer group (``detectflow.shadow``) reads the preprocessed topics of both lanes, so it sees
every record production's inference sees, at its own pace: a slow shadow lags, it never slows
production's consumers (it does share the host's cores). It reads them only while some model has a
shadow version (``on_demand_topics``), from the moment one is set: no shadow, no fetch. For records
of a model that has a shadow version, the shadow model runs (micro-batched like inference), its
candidates are post-processed exactly as production's (the request's params, NMS, boxes back to the
oriented original), and the DetectionResult goes to `detections.shadow`, keyed by request id. It
never replies, never stores results, never writes a DLQ or a terminal result: a shadow failure is
counted and dropped, and cannot touch a request. The monitor (processors/monitor.py) pairs these
results with production's.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from typing import Any

from config import PipelineSettings
from model_store.catalog import ModelCatalog, ModelNotFound
from model_store.routing import Routing
from processors.inference import InferenceStage
from processors.params import effective_params
from processors.postprocess import detections
from schemas import events
from stream.errors import InvalidRecord, TransientError
from stream.records import Failure, Outcome, Output, Record, now_ms
from stream.topics import LANES, lane_topic

log = logging.getLogger(__name__)


def shadow_topic(prefix: str = "") -> str:
    return f"{prefix}detections.shadow"


def shadow_result(inferred: dict[str, Any], class_names: tuple[str, ...], settings: PipelineSettings) -> dict[str, Any]:
    """The shadow's DetectionResult for one InferenceOutput (the same post-processing as production's)."""
    ctx = inferred["context"]
    params = effective_params(ctx.get("params"), settings, class_names)
    return events.detection_result(
        request_id=ctx["request_id"], tenant=ctx["tenant"], status="OK",
        detections=detections(inferred, params, class_names), image_width=inferred["original_width"],
        image_height=inferred["original_height"], image_sha256=inferred["image_sha256"],
        model_name=inferred["model_name"], model_version=inferred["model_version"],
        timings_ms=inferred.get("timings_ms", {}), job_id=ctx.get("job_id"), lane=ctx.get("lane") or "ONLINE",
        completed_at=now_ms())


class ShadowStage:
    name = "shadow"
    input_event = "ImagePreprocessed"
    emits_terminal_results = False

    def __init__(self, catalog: ModelCatalog, settings: PipelineSettings, inference: InferenceStage | None = None):
        self.catalog = catalog
        self.settings = settings
        self.prefix = settings.stream.topic_prefix
        self.runner = inference or InferenceStage(catalog, settings)
        self.skipped: Tally[str] = Tally()

    def input_topics(self) -> list[str]:
        return [lane_topic(self.prefix, lane, "preprocessed") for lane in LANES]

    def on_demand_topics(self) -> dict[str, bool]:
        """Its inputs are read only while some model has a shadow version (stream/runtime.py): otherwise the
        role fetches no tensor at all, and when a shadow is set it starts at the topics' end (new traffic)."""
        table = self.catalog.table
        shadowed = table is not None and any(
            (r := table.routing(m)) is not None and r.shadow is not None for m in table.models())
        return dict.fromkeys(self.input_topics(), shadowed)

    def on_routing(self, routing: Routing) -> None:
        """Load a new shadow version in the background, before its records arrive."""
        if routing.shadow is not None:
            self.runner.on_routing(Routing(model=routing.model, production=routing.shadow,
                                           versions=routing.versions))

    def _shadow_of(self, rec: Record) -> tuple[str, int] | None:
        model = rec.value["context"]["model"]
        routing = self.catalog.table.routing(model["name"]) if self.catalog.table is not None else None
        if routing is None or routing.shadow is None or routing.shadow == model.get("version"):
            return None
        return model["name"], routing.shadow

    def process(self, batch: list[Record]) -> list[Outcome]:
        outcomes: list[Outcome] = [[] for _ in batch]
        groups: dict[tuple[str, int], list[int]] = {}
        for i, rec in enumerate(batch):
            key = self._shadow_of(rec)
            if key is not None:
                groups.setdefault(key, []).append(i)
        for (name, version), idx in groups.items():
            try:
                loaded = self.runner.model(name, version)
            except (InvalidRecord, TransientError) as exc:
                self._skip("load", len(idx), f"{name} v{version}: {exc}")
                continue
            limit = max(1, min(self.settings.inference_max_batch, loaded.version.config.max_batch))
            for start in range(0, len(idx), limit):
                chunk = [(i, batch[i]) for i in idx[start:start + limit]]
                for i, outcome in self.runner._run_chunk(loaded, chunk):
                    outcomes[i] = self._results(outcome, loaded.version.config.class_names)
        return outcomes

    def _results(self, outcome: Outcome, class_names: tuple[str, ...]) -> list[Output]:
        if isinstance(outcome, Failure):
            self._skip("invalid", 1, str(outcome.error))
            return []
        out = []
        for o in outcome:
            try:
                result = shadow_result(o.value, tuple(class_names), self.settings)
            except (ModelNotFound, InvalidRecord, KeyError, ValueError) as exc:
                self._skip("postprocess", 1, str(exc))
                continue
            out.append(Output(shadow_topic(self.prefix), result["request_id"], result, "DetectionResult"))
        return out

    def _skip(self, why: str, n: int, detail: str) -> None:
        from processors import metrics as PM

        self.skipped[why] += n
        PM.SHADOW_SKIPPED.labels(why).inc(n)
        log.warning("shadow: %d record(s) skipped (%s): %s", n, why, detail)

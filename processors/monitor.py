"""monitor: canary guardrails and shadow agreement, from `detections` and `detections.shadow`.

Guardrails. Every result on `detections` of a model with a canary is added to its version's window
(the last ``guard_window_s``, bounded) of the current (production, canary) pair: FAILED or not
(REJECTED is the input's fault and cache hits ran no model: neither counts) and the per-image model
latency. Once canary and production both have
``guard_min_samples`` results, the canary is rolled back automatically when its FAILED share exceeds
production's by more than ``guard_max_error_rate_delta``, or its P95 model latency exceeds production's
times ``guard_latency_factor`` plus ``guard_latency_slack_ms``. The rollback goes through the
registry (compare-and-set, only if that version is still the canary), so it is published on `models`,
audited (actor ``guardrail``, with the figures) and counted (detectflow_canary_rollbacks_total).
A canary is judged only against production results of its own time: when a model's (production, canary)
pair changes, its windows start empty, so an earlier canary's production samples (another load, another
batch mix) never set the bar for the next one.

Shadow agreement. Production results and shadow results of the same request (both keyed by request
id) are paired in a bounded buffer; each pair is compared per class (greedy matching by score at IoU
>= 0.5: matched, production-only, shadow-only, |score delta| of matches, model latency of each side),
exported as metrics and added to the shadow_agreement counters that `detectflow models compare`
prints. The buffer is memory: a restart loses unpaired halves (they are statistics, not results).

Idle, it costs nothing: `detections` is read only while some model has a canary or a shadow version, and
`detections.shadow` only while one has a shadow, each from the moment it is set (``on_demand_topics``).
(TENANT_MISMATCH refusals on `detections` are audited by the recorder, processors/recorder.py.)
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from config import LifecycleSettings, PipelineSettings
from model_store.control.registry import RegistryError
from model_store.serving.boxes import box_iou
from model_store.serving.routing import RoutingTable
from processors import metrics as PM
from processors.shadow import shadow_topic
from stream.errors import TransientError
from stream.records import Outcome, Record
from stream.topics import detections_topic

log = logging.getLogger(__name__)
MATCH_IOU = 0.5
WINDOW_MAX = 5000


# ---------------------------------------------------------------------------------------------- agreement
@dataclass
class ClassAgreement:
    matched: int = 0
    production_only: int = 0
    shadow_only: int = 0
    score_deltas: list[float] = field(default_factory=list)


def _boxes(dets: Sequence[Mapping[str, Any]]) -> np.ndarray:
    return np.asarray([[d["box"]["x1"], d["box"]["y1"], d["box"]["x2"], d["box"]["y2"]] for d in dets],
                      dtype=np.float32).reshape(-1, 4)


def agreement(production: Sequence[Mapping[str, Any]], shadow: Sequence[Mapping[str, Any]],
              iou: float = MATCH_IOU) -> dict[str, ClassAgreement]:
    """Per class name: greedy one-to-one matching, best production score first, at IoU >= ``iou``."""
    out: dict[str, ClassAgreement] = {}
    for name in sorted({d["class_name"] for d in (*production, *shadow)}):
        p = sorted((d for d in production if d["class_name"] == name), key=lambda d: -d["score"])
        s = [d for d in shadow if d["class_name"] == name]
        stats = out.setdefault(name, ClassAgreement())
        free = np.ones(len(s), dtype=bool)
        sb = _boxes(s)
        for d in p:
            if not free.any():
                stats.production_only += 1
                continue
            ious = np.where(free, box_iou(_boxes([d])[0], sb), -1.0)
            j = int(np.argmax(ious))
            if ious[j] >= iou:
                free[j] = False
                stats.matched += 1
                stats.score_deltas.append(abs(float(d["score"]) - float(s[j]["score"])))
            else:
                stats.production_only += 1
        stats.shadow_only += int(free.sum())
    return out


# ---------------------------------------------------------------------------------------------- guardrails
@dataclass(frozen=True)
class WindowStats:
    samples: int
    error_rate: float
    p95_ms: float | None


class Window:
    """One version's recent results: (monotonic time, failed, model ms or None), bounded in time and size."""

    def __init__(self, span_s: float):
        self.span_s = span_s
        self._items: deque[tuple[float, bool, float | None]] = deque(maxlen=WINDOW_MAX)

    def add(self, now: float, failed: bool, model_ms: float | None) -> None:
        self._items.append((now, failed, model_ms))

    def stats(self, now: float) -> WindowStats:
        while self._items and self._items[0][0] < now - self.span_s:
            self._items.popleft()
        n = len(self._items)
        latencies = [ms for _, _, ms in self._items if ms is not None]
        return WindowStats(n, sum(1 for _, f, _ in self._items if f) / n if n else 0.0,
                           float(np.percentile(latencies, 95)) if latencies else None)


def breach(production: WindowStats, canary: WindowStats, s: LifecycleSettings) -> tuple[str, str] | None:
    """(cause, explanation) when the canary breaches a guardrail against production, else None."""
    if production.samples < s.guard_min_samples or canary.samples < s.guard_min_samples:
        return None
    if canary.error_rate > production.error_rate + s.guard_max_error_rate_delta:
        return "error_rate", (f"canary FAILED share {canary.error_rate:.1%} over {canary.samples} results vs "
                              f"production {production.error_rate:.1%} over {production.samples} (allowed +"
                              f"{s.guard_max_error_rate_delta:.1%})")
    if canary.p95_ms is not None and production.p95_ms is not None:
        limit = production.p95_ms * s.guard_latency_factor + s.guard_latency_slack_ms
        if canary.p95_ms > limit:
            return "latency", (f"canary P95 model latency {canary.p95_ms:.1f} ms vs production "
                               f"{production.p95_ms:.1f} ms (limit {limit:.1f} ms = x{s.guard_latency_factor:g} "
                               f"+ {s.guard_latency_slack_ms:g} ms)")
    return None


def counts_for_guardrail(result: Mapping[str, Any]) -> bool:
    return not result.get("cache_hit") and result.get("status") in ("OK", "FAILED")


def model_ms(result: Mapping[str, Any]) -> float | None:
    value = (result.get("timings_ms") or {}).get("inference")
    return float(value) if value is not None else None


# ---------------------------------------------------------------------------------------------- the stage
class MonitorStage:
    name = "monitor"
    input_event = "DetectionResult"
    emits_terminal_results = False

    def __init__(self, table: RoutingTable, registry: Any, settings: PipelineSettings,
                 clock: Any = time.monotonic):
        self.table = table
        self.registry = registry  # model_store.control.registry.Registry: rollback() and store.add_agreement()
        self.settings = settings
        self.lifecycle = settings.lifecycle
        self.prefix = settings.stream.topic_prefix
        self.clock = clock
        self.windows: dict[tuple[str, int], Window] = {}  # (model, version), of the pair in self.pairs
        self.pairs: dict[str, tuple[int | None, int]] = {}  # model -> the (production, canary) its windows are of
        self.pending: OrderedDict[str, tuple[str, Mapping[str, Any]]] = OrderedDict()
        self._next_check = 0.0
        self.rollbacks: list[tuple[str, int, str]] = []

    def input_topics(self) -> list[str]:
        return [detections_topic(self.prefix), shadow_topic(self.prefix)]

    def on_demand_topics(self) -> dict[str, bool]:
        """Each input is read only while it has work, from that moment on (stream/runtime.py): `detections`
        while some model has a canary (guardrails) or a shadow (agreement's production side), `detections.shadow`
        while one has a shadow (agreement pairs results of the same request; the shadow role reads only new
        traffic too). With neither, the monitor is in no consumer group and fetches nothing."""
        routings = [r for m in self.table.models() if (r := self.table.routing(m)) is not None]
        shadowed = any(r.shadow is not None for r in routings)
        return {detections_topic(self.prefix): shadowed or any(r.canary is not None for r in routings),
                shadow_topic(self.prefix): shadowed}

    def process(self, batch: list[Record]) -> list[Outcome]:
        outcomes: list[Outcome] = [[] for _ in batch]
        now = self.clock()
        sums: dict[tuple[str, int, int, str], dict[str, float]] = {}
        for rec in batch:
            result = rec.value
            shadow_side = rec.topic == shadow_topic(self.prefix)
            routing = self.table.routing(result.get("model_name") or "")
            if routing is None:
                continue
            if not shadow_side and routing.canary is not None and counts_for_guardrail(result) \
                    and result.get("model_version") in (routing.production, routing.canary):
                self._window(routing.model, routing.production, routing.canary,
                             int(result["model_version"])).add(now, result["status"] == "FAILED", model_ms(result))
            if routing.shadow is not None or shadow_side:
                self._pair(result, "shadow" if shadow_side else "production", sums)
        if sums:
            self._store_agreement(sums)
        if now >= self._next_check:
            self._next_check = now + self.lifecycle.guard_check_interval_s
            self.check_guardrails(now)
        return outcomes

    # ---- guardrails -----------------------------------------------------------------------------------
    def _window(self, model: str, production: int | None, canary: int, version: int) -> Window:
        """The version's window for this (production, canary) pair; a new pair drops the model's old windows."""
        if self.pairs.get(model) != (production, canary):
            self.pairs[model] = (production, canary)
            for key in [k for k in self.windows if k[0] == model]:
                del self.windows[key]
        return self.windows.setdefault((model, version), Window(self.lifecycle.guard_window_s))

    def check_guardrails(self, now: float) -> None:
        for model in self.table.models():
            routing = self.table.routing(model)
            if routing is None or routing.canary is None or routing.production is None:
                continue
            if self.pairs.get(model) != (routing.production, routing.canary):
                continue  # no result of this pair yet
            prod = self.windows.get((model, routing.production))
            canary = self.windows.get((model, routing.canary))
            if prod is None or canary is None:
                continue
            ps, cs = prod.stats(now), canary.stats(now)
            for version, st in ((routing.production, ps), (routing.canary, cs)):
                PM.GUARD_ERROR_RATE.labels(model, str(version)).set(st.error_rate)
                if st.p95_ms is not None:
                    PM.GUARD_P95_MS.labels(model, str(version)).set(st.p95_ms)
            if not routing.guardrail:
                continue
            verdict = breach(ps, cs, self.lifecycle)
            if verdict is not None:
                self._roll_back(model, routing.canary, *verdict)

    def _roll_back(self, model: str, version: int, cause: str, why: str) -> None:

        try:
            self.registry.rollback(model, actor="guardrail", reason=f"guardrail breach ({cause}): {why}",
                                   only_canary=version)
        except RegistryError as exc:  # someone changed the canary first: nothing to undo
            log.info("guardrail: %s v%s not rolled back: %s", model, version, exc)
            return
        except TransientError as exc:
            log.warning("guardrail: rollback of %s v%s failed, will retry: %s", model, version, exc)
            return
        PM.CANARY_ROLLBACKS.labels(model, str(version), cause).inc()
        self.rollbacks.append((model, version, cause))
        self.windows.pop((model, version), None)
        log.warning("guardrail: canary %s v%s rolled back: %s", model, version, why)

    # ---- shadow agreement -----------------------------------------------------------------------------
    def _pair(self, result: Mapping[str, Any], side: str, sums: dict[tuple[str, int, int, str], dict[str, float]]
              ) -> None:
        if result.get("status") != "OK" or result.get("cache_hit"):
            return
        rid = result["request_id"]
        other = self.pending.get(rid)
        if other is None or other[0] == side:
            self.pending[rid] = (side, result)
            while len(self.pending) > self.lifecycle.shadow_pending_max:
                _, (_, dropped) = self.pending.popitem(last=False)
                PM.SHADOW_UNPAIRED.labels(dropped.get("model_name") or "").inc()
            return
        del self.pending[rid]
        prod, shadow = (result, other[1]) if side == "production" else (other[1], result)
        model, pv, sv = prod["model_name"], int(prod["model_version"]), int(shadow["model_version"])
        per_class = agreement(prod["detections"], shadow["detections"])
        total = sums.setdefault((model, pv, sv, "*"), {})
        for name, a in per_class.items():
            row = sums.setdefault((model, pv, sv, name), {})
            for k, v in (("matched", a.matched), ("production_only", a.production_only),
                         ("shadow_only", a.shadow_only), ("score_delta", sum(a.score_deltas))):
                row[k] = row.get(k, 0) + v
                total[k] = total.get(k, 0) + v
            for outcome in ("matched", "production_only", "shadow_only"):
                if getattr(a, outcome):
                    PM.SHADOW_MATCHES.labels(model, str(sv), name, outcome).inc(getattr(a, outcome))
            for delta in a.score_deltas:
                PM.SHADOW_SCORE_DELTA.labels(model, str(sv)).observe(delta)
        total["images"] = total.get("images", 0) + 1
        for r, key, version in ((prod, "production_ms", pv), (shadow, "shadow_ms", sv)):
            ms = model_ms(r)
            if ms is not None:
                total[key] = total.get(key, 0) + ms
                PM.SHADOW_LATENCY_MS.labels(model, str(version), key.split("_")[0]).observe(ms)

    def _store_agreement(self, sums: dict[tuple[str, int, int, str], dict[str, float]]) -> None:
        try:
            for (model, pv, sv, name), row in sums.items():
                self.registry.store.add_agreement(
                    model, pv, sv, name, images=int(row.get("images", 0)), matched=int(row.get("matched", 0)),
                    production_only=int(row.get("production_only", 0)), shadow_only=int(row.get("shadow_only", 0)),
                    score_delta=row.get("score_delta", 0.0), production_ms=row.get("production_ms", 0.0),
                    shadow_ms=row.get("shadow_ms", 0.0))
        except TransientError as exc:
            # Statistics: losing one batch's counts is better than stalling the guardrails behind Cassandra.
            log.warning("shadow agreement not stored for this batch: %s", exc)

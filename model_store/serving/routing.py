"""Which version of a model serves which request: the routing state and its transitions (pure).

The state of one model is a ``Routing``: its production version, an optional canary with the share of
traffic it gets, an optional shadow, the earlier production versions (what a rollback restores) and
the servable versions (what a request may pin). Every registry command is a function from one state
to the next here; the registry stores the result (Cassandra, compare-and-set on ``revision``) and
publishes it on the compacted `models` topic, which the serving processes fold back into a Routing.

A request's route is deterministic: the first 8 bytes of sha256(request id) give it a bucket in
0..9999, and buckets below ``canary_percent * 100`` go to the canary. The same request id (a retry,
a redelivery, an Idempotency-Key replay) always lands on the same version.

A ``RoutingTable`` holds the latest state per model and the READY/LOAD_FAILED reports of the serving
processes; the watcher (``model_store.control.watch``) folds the `models` topic into it, and the catalog
(``model_store.serving.catalog``) routes requests with it.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, replace
from typing import Any, Mapping

from stream.serde import epoch_ms

BUCKETS = 10_000
MAX_PREVIOUS = 5  # rollback depth kept in the state


class RoutingError(ValueError):
    """A registry command that the current state does not allow (the message says why)."""


def bucket_of(request_id: str) -> int:
    """The request's routing bucket in 0..BUCKETS-1 (stable across processes and languages)."""
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") % BUCKETS


@dataclass(frozen=True)
class Routing:
    model: str
    production: int | None = None
    canary: int | None = None
    canary_percent: float = 0.0
    shadow: int | None = None
    previous: tuple[int, ...] = ()
    versions: tuple[int, ...] = ()
    guardrail: bool = True
    revision: int = 0

    def route(self, request_id: str, unavailable: frozenset[int] = frozenset()) -> int | None:
        """The version serving ``request_id``; versions in ``unavailable`` (failed to load) are skipped."""
        if (self.canary is not None and self.canary not in unavailable
                and bucket_of(request_id) < round(self.canary_percent * BUCKETS / 100)):
            return self.canary
        for v in (self.production, *self.previous):
            if v is not None and v not in unavailable and v in self.versions:
                return v
        return self.production

    def serving(self) -> tuple[int, ...]:
        """Versions that take live traffic or shadow it, production first."""
        return tuple(v for v in (self.production, self.canary, self.shadow) if v is not None)

    # ---- transitions (each returns the next state; revision is bumped by the store) ---------------
    def pushed(self, version: int) -> Routing:
        versions = tuple(sorted({*self.versions, version}))
        if self.production is None:  # a model's first version serves at once: there is nothing else
            return replace(self, production=version, versions=versions)
        return replace(self, versions=versions)

    def promoted(self, version: int) -> Routing:
        self._require_servable(version)
        if version == self.production:
            return replace(self, canary=None, canary_percent=0.0) if self.canary == version else self
        previous = self.previous if self.production is None else (self.production, *self.previous)
        return replace(self, production=version, previous=_dedupe(previous, version),
                       canary=None, canary_percent=0.0,
                       shadow=None if self.shadow == version else self.shadow)

    def with_canary(self, version: int, percent: float, guardrail: bool = True) -> Routing:
        self._require_servable(version)
        if not 0.0 < percent < 100.0:
            raise RoutingError(f"canary percent must be in (0, 100), got {percent}; use promote for 100")
        if version == self.production:
            raise RoutingError(f"version {version} is already production")
        return replace(self, canary=version, canary_percent=float(percent), guardrail=guardrail)

    def with_shadow(self, version: int | None) -> Routing:
        if version is not None:
            self._require_servable(version)
            if version == self.production:
                raise RoutingError(f"version {version} is production; a shadow runs beside production")
        return replace(self, shadow=version)

    def rolled_back(self) -> Routing:
        """Abort a running canary; without one, restore the previous production version."""
        if self.canary is not None:
            return replace(self, canary=None, canary_percent=0.0)
        restorable = [v for v in self.previous if v in self.versions]
        if not restorable:
            raise RoutingError(f"model {self.model!r} has no previous production version to roll back to")
        target = restorable[0]
        return replace(self, production=target, previous=tuple(v for v in self.previous if v != target))

    def retired(self, version: int) -> Routing:
        if version not in self.versions:
            raise RoutingError(f"model {self.model!r} has no servable version {version}")
        if version in self.serving():
            raise RoutingError(f"version {version} is serving (production, canary or shadow); change that first")
        return replace(self, versions=tuple(v for v in self.versions if v != version),
                       previous=tuple(v for v in self.previous if v != version))

    def _require_servable(self, version: int) -> None:
        if version not in self.versions:
            raise RoutingError(f"model {self.model!r} has no servable version {version}")

    # ---- the wire form (ModelEvent fields) ------------------------------------------------------------
    def event_fields(self) -> dict[str, Any]:
        return {"production_version": self.production, "canary_version": self.canary,
                "canary_percent": float(self.canary_percent), "shadow_version": self.shadow,
                "versions": list(self.versions), "previous_versions": list(self.previous),
                "guardrail": self.guardrail}

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> Routing:
        return cls(model=event["model_name"], production=event.get("production_version"),
                   canary=event.get("canary_version"), canary_percent=float(event.get("canary_percent") or 0.0),
                   shadow=event.get("shadow_version"), previous=tuple(event.get("previous_versions") or ()),
                   versions=tuple(event.get("versions") or ()), guardrail=bool(event.get("guardrail", True)))


def _dedupe(previous: tuple[int, ...], new_production: int) -> tuple[int, ...]:
    out: list[int] = []
    for v in previous:
        if v != new_production and v not in out:
            out.append(v)
    return tuple(out[:MAX_PREVIOUS])


# Routing-state actions (keyed by model name on the compacted topic) versus per-instance reports
# (keyed name/version/instance, so compaction keeps each instance's latest report).
STATE_ACTIONS = frozenset({"PUSHED", "PROMOTED", "CANARY", "SHADOW", "ROLLED_BACK", "RETIRED"})
REPORT_ACTIONS = frozenset({"READY", "LOAD_FAILED"})


def report_key(model: str, version: int, instance: str) -> str:
    return f"{model}/{version}/{instance}"


@dataclass(frozen=True)
class Report:
    model: str
    version: int
    action: str  # READY | LOAD_FAILED
    instance: str
    reason: str | None
    at_ms: int


class RoutingTable:
    """The latest routing state per model and the load reports; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._routing: dict[str, Routing] = {}
        self._reports: dict[tuple[str, int, str], Report] = {}
        self._local_failures: set[tuple[str, int]] = set()

    def apply(self, event: dict[str, Any]) -> str | None:
        """Fold one ModelEvent in; returns the model name whose routing changed, if any."""
        action = event.get("action")
        name = event["model_name"]
        with self._lock:
            if action in STATE_ACTIONS:
                self._routing[name] = Routing.from_event(event)
                return name
            if action in REPORT_ACTIONS:
                version = int(event["version"])
                self._reports[(name, version, event["actor"])] = Report(
                    name, version, action, event["actor"], event.get("reason"), epoch_ms(event["at"]) or 0)
        return None

    def routing(self, model: str) -> Routing | None:
        with self._lock:
            return self._routing.get(model)

    def models(self) -> list[str]:
        with self._lock:
            return sorted(self._routing)

    def reports(self, model: str, version: int) -> list[Report]:
        with self._lock:
            return [r for (m, v, _), r in self._reports.items() if m == model and v == version]

    def mark_failed(self, model: str, version: int, failed: bool = True) -> None:
        """This process could not load the version: route around it here (others decide for themselves)."""
        with self._lock:
            (self._local_failures.add if failed else self._local_failures.discard)((model, version))

    def unavailable(self, model: str) -> frozenset[int]:
        """Versions that failed to load: here, or (newest report per instance) in an inference process."""
        with self._lock:
            failed = {v for (m, v) in self._local_failures if m == model}
            latest: dict[int, Report] = {}
            for (m, v, _), r in self._reports.items():
                if m == model and (v not in latest or r.at_ms > latest[v].at_ms):
                    latest[v] = r
        failed |= {v for v, r in latest.items() if r.action == "LOAD_FAILED"}
        return frozenset(failed)

    def route(self, model: str, request_id: str) -> int | None:
        r = self.routing(model)
        return None if r is None else r.route(request_id, self.unavailable(model))

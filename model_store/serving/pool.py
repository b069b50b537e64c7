"""The model versions a serving process holds: load with warm-up, least-recently-used eviction, load reports.

A ``ModelPool`` keeps one ``LoadedModel`` (an ONNX Runtime session, warmed up) per (model, version) it serves.
``get`` returns a loaded version, loading it on the caller's thread unless a background load of it is under way,
in which case it waits for that one (never a second load of the same version). ``want`` says which versions of a
model will take traffic: those not loaded yet are loaded on one background thread (a load competes with serving
for the same cores), newest first, while the loaded ones keep serving (a failed load keeps the old model serving,
as in Triton's model management). At most ``max_loaded`` versions stay loaded: past it, the least recently used
version that no ``want`` asked for is unloaded.

Every outcome is a ``PoolEvent`` to the pool's listeners (the stage's metrics, the READY/LOAD_FAILED reports on
`models`): READY once a version is loaded and warmed up, LOAD_FAILED when its session cannot be opened (or, in
the background, when the version cannot be found or fetched), UNLOADED when it is evicted. A version that failed
to load is marked unavailable in the catalog's routing table, so this process routes around it.

Errors are typed: ``LoadFailed`` (the session did not open), ``StillLoading`` (a background load outlived the
wait); ``ModelNotFound`` comes from the catalog. Nothing here knows Kafka records: the stages map these errors
to their failure paths.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np

from model_store.serving.catalog import ModelCatalog, ModelNotFound, ModelVersion
from model_store.serving.session import SessionError, SessionSettings, create_session
from stream.errors import TransientError

log = logging.getLogger(__name__)

READY = "READY"
LOAD_FAILED = "LOAD_FAILED"
UNLOADED = "UNLOADED"
LOAD_WAIT_S = 120.0  # how long a request waits for a background load of its version


class LoadFailed(Exception):
    """A model version's session could not be opened or warmed up; the versions already loaded keep serving."""

    def __init__(self, model: str, version: int, reason: str) -> None:
        super().__init__(model, version, reason)
        self.model, self.version, self.reason = model, version, reason

    def __str__(self) -> str:
        return f"model {self.model} v{self.version} failed to load: {self.reason}"


class StillLoading(Exception):
    """A background load of the version did not finish within the wait."""


@dataclass
class LoadedModel:
    """A model version ready to serve: its session, warmed up."""

    version: ModelVersion
    run: Callable[[np.ndarray], dict[str, np.ndarray]]  # float32 NCHW batch -> outputs by name
    providers: Sequence[str]


@dataclass(frozen=True)
class PoolEvent:
    model: str
    version: int
    action: str  # READY | LOAD_FAILED | UNLOADED
    reason: str | None = None
    provider: str | None = None  # the session's first execution provider (READY, UNLOADED)


Loader = Callable[[ModelVersion], LoadedModel]
Listener = Callable[[PoolEvent], None]


def load_onnx(mv: ModelVersion, threads: int, max_batch: int = 2) -> LoadedModel:
    """Open the version's session on the best usable providers and warm it up (first runs plan and allocate):
    batches of 1, 2 and the largest the stage will send (``max_batch``, within the model's own), so that the
    first full batch under load neither plans nor grows the arena (a soak saw inference's RSS climb for its
    first six minutes when warm-up stopped at 2)."""
    spec = mv.config.input
    session, providers = create_session(mv.model_file, SessionSettings(intra_op_threads=threads),
                                        max_batch=mv.config.max_batch,
                                        input_shape=(spec.name, 3, spec.height, spec.width))
    names = [o.name for o in session.get_outputs()]

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, {spec.name: batch}), strict=True))

    for n in sorted({1, 2, max(1, min(max_batch, mv.config.max_batch))}):
        if n <= mv.config.max_batch:
            run(np.zeros((n, 3, spec.height, spec.width), dtype=np.float32))
    return LoadedModel(mv, run, providers)


class ModelPool:
    """The loaded model versions of one process; thread-safe."""

    def __init__(self, catalog: ModelCatalog, loader: Loader, *, max_loaded: int = 3,
                 load_wait_s: float = LOAD_WAIT_S) -> None:
        self.catalog = catalog
        self._loader = loader
        self._max_loaded = max(1, max_loaded)
        self._load_wait_s = load_wait_s
        self._models: dict[tuple[str, int], LoadedModel] = {}
        self._loading: dict[tuple[str, int], Future[LoadedModel]] = {}
        self._last_used: dict[tuple[str, int], float] = {}
        self._wanted: dict[str, set[int]] = {}
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()
        # One background load at a time: loading competes with serving for the same cores.
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load")

    def add_listener(self, listener: Listener) -> None:
        """``listener`` gets every PoolEvent from now on, on the thread that caused it."""
        self._listeners.append(listener)

    def get(self, name: str, version: int) -> LoadedModel:
        """The loaded version; loads it here unless a background load is under way, else waits for that one.

        Raises ModelNotFound (no such version), LoadFailed (its session did not open), StillLoading, or the
        catalog's TransientError (the version's files could not be fetched)."""
        key = (name, version)
        with self._lock:
            loaded = self._models.get(key)
            pending = self._loading.get(key)
            if loaded is not None:
                self._last_used[key] = time.monotonic()
                return loaded
        if pending is not None:
            try:
                return pending.result(timeout=self._load_wait_s)
            except FutureTimeout as exc:
                raise StillLoading(f"model {name} v{version} still loading after {self._load_wait_s:.0f}s") from exc
        return self._load(key)

    def want(self, name: str, versions: Collection[int]) -> None:
        """These versions of ``name`` will take traffic: load the missing ones in the background, newest first.
        Returns at once; the versions no longer wanted become the first to be unloaded."""
        with self._lock:
            self._wanted[name] = set(versions)
            todo = [(name, v) for v in sorted(versions, reverse=True)
                    if (name, v) not in self._models and (name, v) not in self._loading]
            for key in todo:
                self._loading[key] = self._background.submit(self._background_load, key)
        self._evict()

    def loaded_versions(self) -> list[tuple[str, int]]:
        with self._lock:
            return sorted(self._models)

    def _load(self, key: tuple[str, int]) -> LoadedModel:
        name, version = key
        mv = self.catalog.get(name, version)
        t0 = time.perf_counter()
        try:
            loaded = self._loader(mv)
        except SessionError as exc:
            failed = LoadFailed(name, version, str(exc)[:500])
            self._emit(PoolEvent(name, version, LOAD_FAILED, failed.reason))
            raise failed from exc
        except LoadFailed as exc:
            self._emit(PoolEvent(name, version, LOAD_FAILED, exc.reason))
            raise
        seconds = time.perf_counter() - t0
        log.info("model %s v%s ready on %s in %.1fs", name, version, loaded.providers[0], seconds)
        with self._lock:
            self._models[key] = loaded
            self._last_used[key] = time.monotonic()
        self._emit(PoolEvent(name, version, READY, f"on {loaded.providers[0]} in {seconds:.1f}s", loaded.providers[0]))
        self._evict()
        return loaded

    def _background_load(self, key: tuple[str, int]) -> LoadedModel:
        try:
            return self._load(key)
        except (ModelNotFound, TransientError) as exc:  # LoadFailed has been reported by _load
            self._emit(PoolEvent(key[0], key[1], LOAD_FAILED, str(exc)[:500]))
            raise
        finally:
            with self._lock:
                self._loading.pop(key, None)

    def _evict(self) -> None:
        unloaded: list[PoolEvent] = []
        with self._lock:
            if len(self._models) <= self._max_loaded:
                return
            unneeded = sorted((k for k in self._models if k[1] not in self._wanted.get(k[0], set())),
                              key=lambda k: self._last_used.get(k, 0.0))
            for key in unneeded[: len(self._models) - self._max_loaded]:
                provider = self._models.pop(key).providers[0]
                self._last_used.pop(key, None)
                unloaded.append(PoolEvent(key[0], key[1], UNLOADED, "not needed, least recently used", provider))
        for event in unloaded:
            log.info("model %s v%s unloaded (not needed, least recently used)", event.model, event.version)
            self._emit(event)

    def _emit(self, event: PoolEvent) -> None:
        if event.action == LOAD_FAILED:
            log.error("model %s v%s failed to load; the versions already loaded keep serving: %s", event.model,
                      event.version, event.reason)
        if event.action in (READY, LOAD_FAILED) and self.catalog.table is not None:
            self.catalog.table.mark_failed(event.model, event.version, event.action == LOAD_FAILED)
        for listener in self._listeners:
            listener(event)

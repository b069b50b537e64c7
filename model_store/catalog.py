"""The model versions this process can serve, read from a local model repository.

Layout (Triton's): ``<root>/<model name>/<integer version>/{config.json, model.onnx}``. A version
folder is servable when both files exist.

With a routing table (``model_store.watch``, fed by the registry's `models` topic) the table decides:
a request's version is its pin (one of the registry's servable versions) or its route (production,
or the canary for its share of request-id hashes), and missing version folders are fetched from the
registry on first use (``fetch``). Without one (a bare local repository: unit tests, `detectflow
detect` on a converted model) the production version of a model is its highest local version.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from model_store.config import CONFIG_FILE, MODEL_FILE, ModelConfig, ModelConfigError

if TYPE_CHECKING:
    from model_store.watch import RoutingTable


class ModelNotFound(LookupError):
    """No servable version matches a model selector."""


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    path: Path
    config: ModelConfig

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE


class ModelCatalog:
    """Resolves (name, pinned version or None) to a servable version; configs are read once."""

    def __init__(self, root: Path, table: RoutingTable | None = None,
                 fetch: Callable[[str, int], Path] | None = None):
        self.root = Path(root)
        self.table = table
        self._fetch = fetch  # downloads a version folder into root (raises ModelNotFound / TransientError)
        self._lock = threading.Lock()
        self._loaded: dict[tuple[str, int], ModelVersion] = {}

    def versions(self, name: str) -> list[int]:
        folder = self.root / name
        if not _safe_name(name) or not folder.is_dir():
            return []
        found = []
        for child in folder.iterdir():
            if child.name.isdigit() and (child / CONFIG_FILE).is_file() and (child / MODEL_FILE).is_file():
                found.append(int(child.name))
        return sorted(found)

    def resolve(self, name: str, version: int | None = None, request_id: str | None = None) -> ModelVersion:
        """The version that serves a request. ``request_id`` is the routing key (canary splits hash it)."""
        routing = self.table.routing(name) if self.table is not None and _safe_name(name) else None
        if routing is not None:
            if version is not None and version not in routing.versions:
                raise ModelNotFound(f"model {name!r} has no servable version {version}")
            chosen = version if version is not None else self.table.route(name, request_id or "")  # type: ignore[union-attr]
            if chosen is None:
                raise ModelNotFound(f"model {name!r} has no production version")
            return self.get(name, chosen)
        available = self.versions(name)
        if not available:
            raise ModelNotFound(f"model {name!r} has no servable version")
        chosen = available[-1] if version is None else version
        if chosen not in available:
            raise ModelNotFound(f"model {name!r} has no servable version {version}")
        return self.get(name, chosen)

    def check(self, name: str, version: int | None) -> None:
        """Raise ModelNotFound unless (name, version) could serve; reads no model files (the gateway's check)."""
        routing = self.table.routing(name) if self.table is not None and _safe_name(name) else None
        if routing is not None:
            if version is not None and version not in routing.versions:
                raise ModelNotFound(f"model {name!r} has no servable version {version}")
            if version is None and routing.production is None:
                raise ModelNotFound(f"model {name!r} has no production version")
            return
        available = self.versions(name)
        if not available or (version is not None and version not in available):
            raise ModelNotFound(f"model {name!r} has no servable version" + (f" {version}" if version else ""))

    def get(self, name: str, version: int) -> ModelVersion:
        key = (name, version)
        with self._lock:
            if key in self._loaded:
                return self._loaded[key]
        path = self.root / name / str(version)
        if not _safe_name(name):
            raise ModelNotFound(f"invalid model name {name!r}")
        if self._fetch is not None and not ((path / CONFIG_FILE).is_file() and (path / MODEL_FILE).is_file()):
            path = self._fetch(name, version)
        try:
            config = ModelConfig.load(path / CONFIG_FILE)
        except ModelConfigError as exc:
            raise ModelNotFound(f"model {name!r} version {version}: {exc}") from exc
        mv = ModelVersion(name, version, path, config)
        with self._lock:
            self._loaded[key] = mv
        return mv


def _safe_name(name: str) -> bool:
    # Model names come from requests: never let one climb out of the repository.
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..") and len(name) <= 128

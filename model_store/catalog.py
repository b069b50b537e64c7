"""The model versions this process can serve, read from a local model repository.

Layout (Triton's): ``<root>/<model name>/<integer version>/{config.json, model.onnx}``. A version
folder is servable when both files exist.

A request's version is decided by the registry, never by what happens to be on disk. With a routing
table (``model_store.watch``, fed by the registry's `models` topic) a request's version is its pin (one
of the registry's servable versions) or its route (production, or the canary for its share of
request-id hashes); missing version folders are fetched from the registry on first use (``fetch``).
A model the table has no routing for serves nothing: the local folder may hold a version that was
pushed but never promoted, or retired. Without a table (the stages that run a version already chosen
upstream, offline tools) only pinned versions resolve.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from model_store.config import CONFIG_FILE, MODEL_FILE, ModelConfig, ModelConfigError
from schemas.names import MODEL_NAME_RULE, valid_model_name

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
        if not valid_model_name(name) or not folder.is_dir():
            return []
        found = []
        for child in folder.iterdir():
            if child.name.isdigit() and (child / CONFIG_FILE).is_file() and (child / MODEL_FILE).is_file():
                found.append(int(child.name))
        return sorted(found)

    def resolve(self, name: str, version: int | None = None, request_id: str | None = None) -> ModelVersion:
        """The version that serves a request. ``request_id`` is the routing key (canary splits hash it)."""
        self.check(name, version)
        if version is None:
            version = self.table.route(name, request_id or "")  # type: ignore[union-attr]  # check() proved a table
            if version is None:
                raise ModelNotFound(f"model {name!r} has no production version")
        elif self.table is None and version not in self.versions(name) and self._fetch is None:
            raise ModelNotFound(f"model {name!r} has no servable version {version}")
        return self.get(name, version)

    def check(self, name: str, version: int | None) -> None:
        """Raise ModelNotFound unless (name, version) could serve; reads no model files (the gateway's check)."""
        if not valid_model_name(name):
            raise ModelNotFound(f"invalid model name {name!r}: {MODEL_NAME_RULE}")
        if self.table is None:
            if version is None:
                raise ModelNotFound(f"model {name!r}: no routing table here, so only a pinned version resolves")
            return
        routing = self.table.routing(name)
        if routing is None:
            raise ModelNotFound(f"model {name!r} has no production version (push it and promote it: "
                                "`detectflow models push`, `detectflow models promote`)")
        if version is not None and version not in routing.versions:
            raise ModelNotFound(f"model {name!r} has no servable version {version}")
        if version is None and routing.production is None:
            raise ModelNotFound(f"model {name!r} has no production version")

    def get(self, name: str, version: int) -> ModelVersion:
        key = (name, version)
        with self._lock:
            if key in self._loaded:
                return self._loaded[key]
        path = self.root / name / str(version)
        if not valid_model_name(name):
            raise ModelNotFound(f"invalid model name {name!r}: {MODEL_NAME_RULE}")
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



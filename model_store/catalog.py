"""The model versions this process can serve, read from a local model repository.

Layout (Triton's): ``<root>/<model name>/<integer version>/{config.json, model.onnx}``. A version
folder is servable when both files exist. Until a registry chooses otherwise, the production
version of a model is its highest servable version; a request may pin another.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from model_store.config import CONFIG_FILE, MODEL_FILE, ModelConfig, ModelConfigError


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

    def __init__(self, root: Path):
        self.root = Path(root)
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
        available = self.versions(name)
        if not available:
            raise ModelNotFound(f"model {name!r} has no servable version")
        chosen = available[-1] if version is None else version
        if chosen not in available:
            raise ModelNotFound(f"model {name!r} has no servable version {version}")
        return self.get(name, chosen)

    def get(self, name: str, version: int) -> ModelVersion:
        key = (name, version)
        with self._lock:
            if key in self._loaded:
                return self._loaded[key]
        path = self.root / name / str(version)
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

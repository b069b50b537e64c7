"""Fixtures shared by unit and integration tests.

The suite keeps its own state beside a user's, in the same stack: its own model repository, Cassandra
keyspace and models bucket (and, per test, its own topic prefix and consumer groups). It never serves,
reads or changes a user's model versions, results or registry, so `make test` passes the same on a
fresh machine and on one where someone has pushed, promoted or retired versions.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from config import StackSettings

SUITE_KEYSPACE = "detectflow_test"
SUITE_MODELS_BUCKET = "test-models"
_home = StackSettings.from_env().home
# Set before any settings are built (every fixture and subprocess reads them from the environment).
os.environ.update({
    "DETECTFLOW_MODELS_DIR": str(_home / "test-suite" / "models"),
    "DETECTFLOW_CASSANDRA_KEYSPACE": SUITE_KEYSPACE,
    "DETECTFLOW_MODELS_BUCKET": SUITE_MODELS_BUCKET,
})


@pytest.fixture(scope="session")
def settings() -> StackSettings:
    return StackSettings.from_env()


@pytest.fixture(scope="session", autouse=True)
def default_model_converted() -> Path | None:
    """The default model converted into the suite's repository (0.2 s; a no-op when up to date)."""
    from model_store.convert import SourceMissingError, convert, locate_source

    try:
        source = locate_source()
    except SourceMissingError:  # the model package is not installed: tests that need it skip
        return None
    out = StackSettings.from_env().models_dir / "yolov4-tiny" / "1"
    convert(out, source)
    return out


@pytest.fixture(scope="session")
def sample_images(settings: StackSettings) -> dict[str, Path]:
    """Sample images from package files (ultralytics, Debian darknet, scikit-image), by file name."""
    from model_store.samples import ensure_samples

    paths = ensure_samples(settings.samples_dir, settings.cache_dir)
    return {p.name: p for p in paths}


@pytest.fixture(scope="session")
def sample_jpeg(sample_images: dict[str, Path]) -> bytes:
    return sample_images["bus.jpg"].read_bytes()

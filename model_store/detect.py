"""Reference pre- and post-processing around a darknet-YOLO ONNX model, as small pure stages.

    image (BGR uint8, any size)
      -> letterbox            uint8 [3, H, W] RGB, plus (scale, pad) to undo it later
      -> to_model_input       float32 [N, 3, H, W], 0..1          (batched)
      -> session.run          float32 [N, boxes, 5 + classes]     (decoded in-graph)
      -> decode               per image: candidates above conf_threshold, xyxy in input pixels
      -> nms                  class-aware greedy NMS
      -> unletterbox          xyxy in original image pixels
      -> Detection objects

The streaming pipeline runs the same functions in separate stages (preprocess ships the uint8
letterboxed tensor, inference batches and runs, postprocess decodes); ``Detector`` chains them in
one process for the CLI, tests and benchmarks.

``python -m model_store.detect IMAGE...`` prints a table of detections and timings.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import onnxruntime as ort

from model_store.config import CONFIG_FILE, MODEL_FILE, ModelConfig
from model_store.session import SessionSettings, create_session


class DetectError(ValueError):
    """An image or model output cannot be processed."""


@dataclass(frozen=True)
class Candidates:
    """Boxes of one image: ``boxes`` float32 [K, 4] as x1, y1, x2, y2; ``scores`` [K]; ``class_ids`` [K]."""

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray

    def take(self, index: np.ndarray) -> Candidates:
        return Candidates(self.boxes[index], self.scores[index], self.class_ids[index])

    def __len__(self) -> int:
        return int(self.scores.shape[0])


@dataclass(frozen=True)
class Detection:
    class_id: int
    class_name: str
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original image pixels


# --------------------------------------------------------------------------- preprocessing


def letterbox_region(image_bgr: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float, tuple[int, int]]:
    """The content of the letterbox without its padding: ``image_bgr`` resized keeping its aspect ratio to fit
    ``size`` = (width, height), as an RGB uint8 tensor [3, h, w], with the scale applied and the (left, top) at
    which it sits, centred, in the input. ``place`` pads it into the model input."""
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.dtype != np.uint8:
        raise DetectError(f"expected a BGR uint8 image [H, W, 3], got {image_bgr.dtype} {list(image_bgr.shape)}")
    h, w = image_bgr.shape[:2]
    out_w, out_h = size
    scale = min(out_w / w, out_h / h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    # Bilinear, like darknet's own resize the model was trained with; INTER_AREA would anti-alias
    # but costs ~12 ms instead of ~0.5 ms on a 1080p image here.
    resized = cv2.resize(image_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    region = np.ascontiguousarray(resized[:, :, ::-1].transpose(2, 0, 1))  # BGR HWC -> RGB CHW
    return region, scale, ((out_w - new_w) // 2, (out_h - new_h) // 2)


def place(region: np.ndarray, size: tuple[int, int], pad_value: int, at: tuple[int, int]) -> np.ndarray:
    """The model input [3, height, width]: ``pad_value`` everywhere but the [3, h, w] ``region``, whose top-left
    corner is at ``at`` = (left, top). The caller checks that the region fits."""
    out_w, out_h = size
    left, top = at
    canvas = np.full((3, out_h, out_w), pad_value, dtype=np.uint8)
    canvas[:, top : top + region.shape[1], left : left + region.shape[2]] = region
    return canvas


def letterbox(
    image_bgr: np.ndarray, size: tuple[int, int], pad_value: int
) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Resize keeping aspect ratio into ``size`` = (width, height), centred, padded with ``pad_value``.

    Returns the RGB uint8 tensor [3, height, width], the scale applied, and the (left, top) padding:
    a point p in the original image lands at ``p * scale + pad``.
    """
    region, scale, pad = letterbox_region(image_bgr, size)
    return place(region, size, pad_value, pad), scale, pad


def to_model_input(tensors: Sequence[np.ndarray], scale: float = 1.0 / 255.0) -> np.ndarray:
    """Stack letterboxed uint8 [3, H, W] tensors into the float32 [N, 3, H, W] model input."""
    batch = np.stack(tensors).astype(np.float32)
    batch *= np.float32(scale)
    return batch


# --------------------------------------------------------------------------- postprocessing


def decode(outputs: np.ndarray, config: ModelConfig, conf_threshold: float) -> list[Candidates]:
    """Per image: boxes whose best ``objectness * class probability`` reaches ``conf_threshold``.

    ``outputs``: the model's decoded tensor [N, boxes, 5 + classes] (cx, cy, w, h, obj, classes...).
    """
    if outputs.ndim != 3 or outputs.shape[2] != 5 + config.num_classes:
        raise DetectError(f"expected [N, boxes, {5 + config.num_classes}], got {list(outputs.shape)}")
    result = []
    for image_out in outputs:
        # Objectness first: it rejects almost every box before the 80-wide class product.
        keep = image_out[:, 4] >= conf_threshold
        rows = image_out[keep]
        class_scores = rows[:, 5:] * rows[:, 4:5]
        class_ids = class_scores.argmax(axis=1)
        scores = class_scores[np.arange(rows.shape[0]), class_ids]
        ok = scores >= conf_threshold
        rows, scores, class_ids = rows[ok], scores[ok], class_ids[ok]
        half = rows[:, 2:4] / 2
        boxes = np.concatenate([rows[:, 0:2] - half, rows[:, 0:2] + half], axis=1).astype(np.float32)
        result.append(Candidates(boxes, scores.astype(np.float32), class_ids.astype(np.int64)))
    return result


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box against [K, 4] boxes."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(candidates: Candidates, iou_threshold: float, max_detections: int = 300) -> Candidates:
    """Class-aware greedy NMS: a box suppresses only same-class boxes overlapping more than
    ``iou_threshold``.  Result sorted by descending score (ties keep input order)."""
    if len(candidates) == 0:
        return candidates
    # Shift each class into its own coordinate region so one greedy pass never mixes classes.
    span = float(np.abs(candidates.boxes).max()) + 1.0
    shifted = candidates.boxes + (candidates.class_ids.astype(np.float64) * 2 * span)[:, None]
    order = np.argsort(-candidates.scores, kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < max_detections:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        order = rest[box_iou(shifted[best], shifted[rest]) <= iou_threshold]
    return candidates.take(np.asarray(keep, dtype=np.int64))


def unletterbox(boxes: np.ndarray, scale: float, pad: tuple[int, int], original_size: tuple[int, int]) -> np.ndarray:
    """Map xyxy boxes from letterboxed input pixels back to the original image (width, height), clipped."""
    left, top = pad
    out = (boxes - np.asarray([left, top, left, top], dtype=np.float32)) / np.float32(scale)
    w, h = original_size
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, w)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, h)
    return out


def to_detections(candidates: Candidates, class_names: Sequence[str]) -> list[Detection]:
    return [
        Detection(int(c), class_names[int(c)], float(s), (float(b[0]), float(b[1]), float(b[2]), float(b[3])))
        for b, s, c in zip(candidates.boxes, candidates.scores, candidates.class_ids, strict=True)
    ]


# --------------------------------------------------------------------------- detector


class Detector:
    """A session plus its config, running every stage above in one process."""

    def __init__(self, session: ort.InferenceSession, config: ModelConfig, *, conf_threshold: float = 0.25,
                 iou_threshold: float = 0.45, max_detections: int = 300) -> None:
        self.session = session
        self.config = config
        self.conf_threshold = conf_threshold
        self.iou_threshold = iou_threshold
        self.max_detections = max_detections

    @classmethod
    def from_model_dir(cls, model_dir: Path, settings: SessionSettings | None = None, *,
                       conf_threshold: float = 0.25, iou_threshold: float = 0.45,
                       max_detections: int = 300) -> Detector:
        config = ModelConfig.load(Path(model_dir) / CONFIG_FILE)
        shape = (config.input.name, 3, config.input.height, config.input.width)
        session, _ = create_session(Path(model_dir) / MODEL_FILE, settings, max_batch=config.max_batch,
                                    input_shape=shape)
        return cls(session, config, conf_threshold=conf_threshold, iou_threshold=iou_threshold,
                   max_detections=max_detections)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on a float32 [N, 3, H, W] batch, N <= max_batch."""
        (out,) = self.session.run([self.config.outputs[0].name], {self.config.input.name: batch})
        return out

    def infer_all(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every output by name (the decoder family picks the ones it needs)."""
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, {self.config.input.name: batch}), strict=True))

    def detect(self, images_bgr: Sequence[np.ndarray]) -> list[list[Detection]]:
        """Detections per image, in original pixels, best score first (decoded by the config's family)."""
        from model_store.decoders import decode_outputs  # decoders builds on this module's Candidates

        spec = self.config.input
        results: list[list[Detection]] = []
        for start in range(0, len(images_bgr), self.config.max_batch):
            chunk = images_bgr[start : start + self.config.max_batch]
            boxed = [letterbox(img, (spec.width, spec.height), spec.pad_value) for img in chunk]
            outputs = self.infer_all(to_model_input([t for t, _, _ in boxed], spec.scale))
            decoded = decode_outputs(outputs, self.config, self.conf_threshold, max_candidates=1 << 20)
            for image, (_, scale, pad), cands in zip(chunk, boxed, decoded, strict=True):
                kept = nms(cands, self.iou_threshold, self.max_detections)
                boxes = unletterbox(kept.boxes, scale, pad, (image.shape[1], image.shape[0]))
                results.append(to_detections(Candidates(boxes, kept.scores, kept.class_ids), self.config.class_names))
        return results


# --------------------------------------------------------------------------- CLI


def read_image(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DetectError(f"cannot read image {path}")
    return image


def format_table(names: Sequence[str], results: Sequence[Sequence[Detection]]) -> str:
    lines = [f"{'image':<20} {'class':<14} {'score':>5}  {'x1':>6} {'y1':>6} {'x2':>6} {'y2':>6}"]
    for name, dets in zip(names, results, strict=True):
        if not dets:
            lines.append(f"{name:<20} {'-':<14}")
        for d in dets:
            x1, y1, x2, y2 = d.box
            lines.append(f"{name:<20} {d.class_name:<14} {d.score:5.2f}  {x1:6.0f} {y1:6.0f} {x2:6.0f} {y2:6.0f}")
    return "\n".join(lines)


def benchmark(detector: Detector, images: Sequence[np.ndarray], batch: int, repeats: int) -> dict[str, float]:
    """Median and minimum ms per image of the model alone and of the whole detect(), at one batch size."""
    spec = detector.config.input
    chunk = [images[i % len(images)] for i in range(batch)]
    tensor = to_model_input([letterbox(img, (spec.width, spec.height), spec.pad_value)[0] for img in chunk])
    detector.infer(tensor)  # warm-up: first run allocates and plans
    model_ms, total_ms = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        detector.infer(tensor)
        t1 = time.perf_counter()
        detector.detect(chunk)
        t2 = time.perf_counter()
        model_ms.append((t1 - t0) * 1000 / batch)
        total_ms.append((t2 - t1) * 1000 / batch)
    # The minimum approximates an unloaded host; the median is what a busy one gives.
    return {"model_ms_per_img": float(np.median(model_ms)), "model_min_ms_per_img": float(np.min(model_ms)),
            "detect_ms_per_img": float(np.median(total_ms)), "detect_min_ms_per_img": float(np.min(total_ms))}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_store.detect", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", type=Path, help="image files (default: the sample images)")
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: convert into the state dir)")
    parser.add_argument("--conf", type=float, default=0.25)
    parser.add_argument("--iou", type=float, default=0.45)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ORT default)")
    parser.add_argument("--spin", action="store_true", help="idle ORT threads busy-wait (ORT's default)")
    parser.add_argument("--bench", type=int, default=0, metavar="REPEATS", help="also time batch 1 and 4")
    args = parser.parse_args(argv)

    from config import StackSettings  # only entry points read settings
    from model_store.convert import convert, default_out_dir
    from model_store.samples import ensure_samples

    settings = StackSettings.from_env()
    model_dir = args.model or default_out_dir()
    if args.model is None:
        convert(model_dir)
    paths = args.images or ensure_samples(settings.samples_dir, settings.cache_dir)
    session_settings = SessionSettings(intra_op_threads=args.threads, allow_spinning=args.spin)
    detector = Detector.from_model_dir(model_dir, session_settings, conf_threshold=args.conf, iou_threshold=args.iou)
    images = [read_image(p) for p in paths]
    print(f"providers: {detector.session.get_providers()}")
    print(format_table([p.name for p in paths], detector.detect(images)))
    if args.bench:
        for batch in (1, 4):
            figures = benchmark(detector, images, batch, args.bench)
            print(f"batch {batch}: model {figures['model_ms_per_img']:.1f} ms/img "
                  f"(min {figures['model_min_ms_per_img']:.1f}), detect (pre+model+post) "
                  f"{figures['detect_ms_per_img']:.1f} ms/img (min {figures['detect_min_ms_per_img']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

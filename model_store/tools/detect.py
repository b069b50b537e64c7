"""The detect CLI and its benchmark: ``python -m model_store.tools.detect IMAGE...`` prints a table of detections.

With ``--bench REPEATS`` it also prints the median and minimum ms per image of the model alone and of the whole
``Detector.detect`` (pre + model + post) at batch 1 and 4. Without a ``--model`` folder the default model is
converted into the state directory first; without images, the sample images are used.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

import click
import cv2
import numpy as np

from imaging.letterbox import letterbox, to_model_input
from model_store.serving.boxes import DetectError, Detection
from model_store.serving.detector import Detector
from model_store.serving.session import SessionSettings
from model_store.tools.command_line import CONTEXT_SETTINGS, invoke
from model_store.tools.samples import ensure_samples

PROG = "python -m model_store.tools.detect"
# click's positional arguments carry no help line of their own.
IMAGES_HELP = "IMAGES: image files (default: the sample images)"


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


PATH = click.Path(path_type=Path)


@click.command(context_settings=CONTEXT_SETTINGS, help=(__doc__ or "").splitlines()[0], epilog=IMAGES_HELP)
@click.argument("images", nargs=-1, type=PATH)
@click.option("--model", "model_dir", type=PATH, default=None,
              help="model folder (default: convert into the state dir)")
@click.option("--conf", type=float, default=0.25)
@click.option("--iou", type=float, default=0.45)
@click.option("--threads", type=int, default=0, help="intra-op threads (0: ORT default)")
@click.option("--spin", is_flag=True, help="idle ORT threads busy-wait (ORT's default)")
@click.option("--bench", type=int, default=0, metavar="REPEATS", help="also time batch 1 and 4")
def command(images: tuple[Path, ...], model_dir: Path | None, conf: float, iou: float, threads: int, spin: bool,
            bench: int) -> int:
    """``python -m model_store.tools.detect``'s command line: see ``run``."""
    return run(list(images), model_dir=model_dir, conf=conf, iou=iou, threads=threads, spin=spin, bench=bench)


def run(paths: Sequence[Path], *, model_dir: Path | None, conf: float, iou: float, threads: int, spin: bool,
        bench: int) -> int:
    """Print the detections in ``paths`` (default: the sample images) by ``model_dir`` (default: the default model,
    converted first), then, with ``bench`` repeats, the timings at batch 1 and 4."""
    from config import StackSettings  # only entry points read settings
    from model_store.tools.convert import convert, default_out_dir  # onnx, only to build the default model

    settings = StackSettings.from_env()
    model = model_dir or default_out_dir()
    if model_dir is None:
        convert(model)
    paths = list(paths) or ensure_samples(settings.samples_dir, settings.cache_dir)
    session_settings = SessionSettings(intra_op_threads=threads, allow_spinning=spin)
    detector = Detector.from_model_dir(model, session_settings, conf_threshold=conf, iou_threshold=iou)
    images = [read_image(p) for p in paths]
    print(f"providers: {detector.session.get_providers()}")
    print(format_table([p.name for p in paths], detector.detect(images)))
    if bench:
        for batch in (1, 4):
            figures = benchmark(detector, images, batch, bench)
            print(f"batch {batch}: model {figures['model_ms_per_img']:.1f} ms/img "
                  f"(min {figures['model_min_ms_per_img']:.1f}), detect (pre+model+post) "
                  f"{figures['detect_ms_per_img']:.1f} ms/img (min {figures['detect_min_ms_per_img']:.1f})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m model_store.tools.detect``: 0, or 2 for a usage error (shown with the usage line)."""
    return invoke(command, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())

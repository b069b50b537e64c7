"""`make demo`: bring the stack up, then detect objects in the sample images.

Until the streaming pipeline exists this runs the converted model in-process on
the sample images (read from package files) and prints a table of detections.
"""

from __future__ import annotations

import time

from infra.settings import StackSettings
from infra.stack import manager


def run_demo(settings: StackSettings, *, bring_up: bool = True) -> int:
    from model_store.convert import convert
    from model_store.detect import Detector, read_image
    from model_store.samples import ensure_samples

    if bring_up:
        t0 = time.monotonic()
        manager.up(settings)
        print(manager.format_status(manager.status(settings)))
        print(f"stack healthy in {time.monotonic() - t0:.1f}s\n")
        from stream import topics

        created = [n for n, a in topics.apply(settings.kafka_bootstrap, topics.all_topics()).items() if a == "created"]
        if created:
            print(f"created {len(created)} topics\n")

    model_dir = settings.models_dir / "yolov4-tiny" / "1"
    convert(model_dir)
    images = ensure_samples(settings.samples_dir, settings.cache_dir)
    detector = Detector.from_model_dir(model_dir)
    providers = ", ".join(detector.session.get_providers())
    print(f"model {detector.config.name} on {providers}; {len(images)} sample images\n")
    print(f"{'IMAGE':<20} {'CLASS':<14} {'SCORE':>6}  BOX (x1, y1, x2, y2 px)")
    for path in images:
        t0 = time.perf_counter()
        dets = detector.detect([read_image(path)])[0]
        ms = (time.perf_counter() - t0) * 1000
        if not dets:
            print(f"{path.name:<20} {'-':<14} {'':>6}  (nothing above threshold; {ms:.0f} ms)")
        for i, d in enumerate(dets):
            label = path.name if i == 0 else ""
            box = ", ".join(f"{v:.0f}" for v in d.box)
            suffix = f"   ({ms:.0f} ms)" if i == 0 else ""
            print(f"{label:<20} {d.class_name:<14} {d.score:>6.3f}  ({box}){suffix}")
    return 0

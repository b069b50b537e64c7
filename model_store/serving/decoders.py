"""Decoders per model family: one batch of raw model outputs -> candidate boxes per image.

A decoder takes ``{output name: array}`` (batch axis first), the model's config and a score floor, and
returns one ``Candidates`` per image: boxes x1, y1, x2, y2 in model-input pixels (float32), scores
(float32) and class ids (int64, indices into ``config.class_names``), before NMS.  Candidates keep the
model's own box order.  ``ModelConfig.decoder`` names the family; ``ModelConfig.box_layout`` says how
its tensors are laid out, and each family accepts only the layouts listed in ``LAYOUTS``:

``darknet_yolo``  (``cxcywh_obj_cls``) one output [N, boxes, 5 + C]: cx, cy, w, h (input pixels),
                  objectness, class probabilities, decoded in-graph (our converter's output);
                  score = objectness * best class probability.  This is ``decode``.
``darknet_yolo_raw`` (``cxcywh_obj_cls``) one output per yolo head, in ``config.heads`` order, each
                  [N, A * (5 + C), H, W] logits, channels per anchor tx, ty, tw, th, obj, classes;
                  decoded with the head's anchors, stride, grid and scale_x_y like darknet's [yolo].
``yolov5``        (``cxcywh_obj_cls``) Ultralytics YOLOv5 export [N, boxes, 5 + C]: same math as
                  ``darknet_yolo``.
``yolov8``        (``cxcywh_cls_transposed``) Ultralytics YOLOv8/11 export [N, 4 + C, boxes], or
                  (``cxcywh_cls``) [N, boxes, 4 + C]: cx, cy, w, h then class scores, no objectness;
                  score = best class score.
``ssd``           (``yxyx_norm``) SSD / TF Object Detection API export with NMS built in: four outputs,
                  listed in ``config.outputs`` in this order (names are the config's; defaults in
                  ``SSD_DEFAULT_OUTPUTS``): boxes [N, K, 4] ymin, xmin, ymax, xmax in 0..1 of the input
                  size; scores [N, K]; classes [N, K] as float ids; num_detections [N], only the first
                  num_detections rows of an image being valid.  Class id = round(value) -
                  ``config.class_id_offset`` (0 by default; 1 for TF OD API exports, whose ids are 1-based).

``check_output_contract`` tests an ONNX model's declared output shapes against its family before it is
released; every decoder checks the arrays it is given against the same contract.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from model_store.serving.boxes import Candidates, DetectError
from model_store.serving.config import ModelConfig, OutputSpec

Decoder = Callable[[Mapping[str, np.ndarray], ModelConfig, float], list[Candidates]]

# Expected size of one axis: an int is fixed; a str is a symbol whose known sizes must agree across all
# outputs (the batch "N", SSD's "K"); None is anything.  Actual sizes may be symbolic (a str) or None
# where the ONNX graph leaves them dynamic: they satisfy a symbol or None, never a fixed size.
Dim = int | str | None
Contract = list[tuple[str, tuple[Dim, ...]]]

OBJ_CLS = "cxcywh_obj_cls"
CLS = "cxcywh_cls"
CLS_TRANSPOSED = "cxcywh_cls_transposed"
YXYX_NORM = "yxyx_norm"

LAYOUTS: dict[str, tuple[str, ...]] = {
    "darknet_yolo": (OBJ_CLS,),
    "darknet_yolo_raw": (OBJ_CLS,),
    "yolov5": (OBJ_CLS,),
    "yolov8": (CLS_TRANSPOSED, CLS),
    "ssd": (YXYX_NORM,),
}

SSD_DEFAULT_OUTPUTS = (
    OutputSpec("detection_boxes", ("N", "K", 4), "ymin, xmin, ymax, xmax normalised to 0..1 of the input"),
    OutputSpec("detection_scores", ("N", "K"), "score per box, best first"),
    OutputSpec("detection_classes", ("N", "K"), "class id per box, as a float"),
    OutputSpec("num_detections", ("N",), "valid rows per image"),
)


class DecoderError(ValueError):
    """Model outputs do not fit the model's decoder family, or the config names an unknown family."""


# --------------------------------------------------------------------------- contracts


def _first_output(config: ModelConfig) -> str:
    if not config.outputs:
        raise DecoderError(f"model {config.name!r} declares no outputs")
    return config.outputs[0].name


def _obj_cls_contract(config: ModelConfig) -> Contract:
    # Our converter's box count follows from the heads; an Ultralytics export's is left open.
    boxes = config.num_boxes if config.decoder == "darknet_yolo" and config.heads else None
    return [(_first_output(config), ("N", boxes, 5 + config.num_classes))]


def _raw_contract(config: ModelConfig) -> Contract:
    if not config.heads or len(config.outputs) != len(config.heads):
        raise DecoderError(f"darknet_yolo_raw needs one output per yolo head: {len(config.outputs)} outputs, "
                           f"{len(config.heads)} heads")
    contract: Contract = []
    for output, head in zip(config.outputs, config.heads, strict=True):
        gh, gw = head.grid
        if (gh * head.stride, gw * head.stride) != (config.input.height, config.input.width):
            raise DecoderError(f"head {output.name!r}: grid {head.grid} x stride {head.stride} does not cover "
                               f"the {config.input.width}x{config.input.height} input")
        if len(head.anchors) != len(head.mask):
            raise DecoderError(f"head {output.name!r}: {len(head.anchors)} anchors for mask {head.mask}")
        contract.append((output.name, ("N", len(head.mask) * (5 + config.num_classes), gh, gw)))
    return contract


def _yolov8_contract(config: ModelConfig) -> Contract:
    width = 4 + config.num_classes
    dims: tuple[Dim, ...] = ("N", width, None) if config.box_layout == CLS_TRANSPOSED else ("N", None, width)
    return [(_first_output(config), dims)]


def _ssd_contract(config: ModelConfig) -> Contract:
    if len(config.outputs) != len(SSD_DEFAULT_OUTPUTS):
        raise DecoderError(f"ssd needs {len(SSD_DEFAULT_OUTPUTS)} outputs (boxes, scores, classes, "
                           f"num_detections), config lists {len(config.outputs)}")
    return [(o.name, default.shape) for o, default in zip(config.outputs, SSD_DEFAULT_OUTPUTS, strict=True)]


_CONTRACTS: dict[str, Callable[[ModelConfig], Contract]] = {
    "darknet_yolo": _obj_cls_contract,
    "darknet_yolo_raw": _raw_contract,
    "yolov5": _obj_cls_contract,
    "yolov8": _yolov8_contract,
    "ssd": _ssd_contract,
}


def _contract(family: str, config: ModelConfig) -> Contract:
    if family not in _CONTRACTS:
        raise DecoderError(f"unknown decoder family {family!r}; known: {sorted(_CONTRACTS)}")
    if config.box_layout not in LAYOUTS[family]:
        raise DecoderError(f"{family} does not decode box_layout {config.box_layout!r}; "
                           f"it accepts {list(LAYOUTS[family])}")
    if config.num_classes < 1:
        raise DecoderError(f"model {config.name!r} has no class names")
    return _CONTRACTS[family](config)


def _match(family: str, contract: Contract, shapes: Mapping[str, Sequence[int | str | None]]) -> None:
    bound: dict[str, int] = {}
    for name, dims in contract:
        if name not in shapes:
            raise DecoderError(f"{family}: no output {name!r} among {sorted(shapes)}")
        shape = tuple(shapes[name])
        if len(shape) != len(dims):
            raise DecoderError(f"{family}: output {name!r} is {list(shape)}, expected {list(dims)}")
        for axis, (want, got) in enumerate(zip(dims, shape, strict=True)):
            known = isinstance(got, int | np.integer)
            if isinstance(want, int) and not (known and got == want):
                raise DecoderError(f"{family}: output {name!r} axis {axis} is {got!r}, must be {want} "
                                   f"(shape {list(shape)}, expected {list(dims)})")
            if isinstance(want, str) and known and bound.setdefault(want, int(got)) != got:
                raise DecoderError(f"{family}: output {name!r} axis {axis} is {got}, but another output "
                                   f"has {want}={bound[want]}")


def check_output_contract(config: ModelConfig, shapes: Mapping[str, Sequence[int | str]]) -> None:
    """Raise ``DecoderError`` unless outputs of these shapes (ints, or str/None for dynamic axes)
    can be decoded by ``config.decoder`` with ``config.box_layout``; extra outputs are ignored."""
    _match(config.decoder, _contract(config.decoder, config), shapes)


def _arrays(family: str, outputs: Mapping[str, np.ndarray], config: ModelConfig) -> list[np.ndarray]:
    """The family's outputs, in contract order, once their shapes are checked."""
    contract = _contract(family, config)
    _match(family, contract, {name: np.shape(array) for name, array in outputs.items()})
    return [np.asarray(outputs[name]) for name, _ in contract]


# --------------------------------------------------------------------------- shared steps


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) -> inf for very negative logits gives 0, as it should
        return 1.0 / (1.0 + np.exp(-x))


def _xyxy(cxcywh: np.ndarray) -> np.ndarray:
    half = cxcywh[:, 2:4] / 2
    return np.concatenate([cxcywh[:, 0:2] - half, cxcywh[:, 0:2] + half], axis=1).astype(np.float32)


def _per_image(n: int, image: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
               class_ids: np.ndarray) -> list[Candidates]:
    """Split flat candidates into one ``Candidates`` per image; ``image`` must be sorted ascending."""
    if n == 0:
        return []
    bounds = np.searchsorted(image, np.arange(1, n))
    columns = (np.split(boxes.astype(np.float32, copy=False), bounds),
               np.split(scores.astype(np.float32, copy=False), bounds),
               np.split(class_ids.astype(np.int64, copy=False), bounds))
    return [Candidates(b, s, c) for b, s, c in zip(*columns, strict=True)]


# --------------------------------------------------------------------------- families


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


def _decode_obj_cls(family: str, outputs: Mapping[str, np.ndarray], config: ModelConfig,
                    floor: float) -> list[Candidates]:
    (out,) = _arrays(family, outputs, config)
    try:
        return decode(out, config, floor)
    except DetectError as exc:
        raise DecoderError(f"{family}: {exc}") from exc


def decode_darknet_yolo(outputs: Mapping[str, np.ndarray], config: ModelConfig, floor: float) -> list[Candidates]:
    """Our converter's in-graph decoded output: exactly ``decode``."""
    return _decode_obj_cls("darknet_yolo", outputs, config, floor)


def decode_yolov5(outputs: Mapping[str, np.ndarray], config: ModelConfig, floor: float) -> list[Candidates]:
    return _decode_obj_cls("yolov5", outputs, config, floor)


def decode_darknet_yolo_raw(outputs: Mapping[str, np.ndarray], config: ModelConfig,
                            floor: float) -> list[Candidates]:
    """Raw darknet head maps; boxes come out in the converter's order (head, anchor, row, column)."""
    maps = _arrays("darknet_yolo_raw", outputs, config)
    c5 = 5 + config.num_classes
    parts: list[tuple[np.ndarray, ...]] = []
    for head, raw in zip(config.heads, maps, strict=True):
        n, _, gh, gw = raw.shape
        t = raw.astype(np.float32, copy=False).reshape(n, len(head.mask), c5, gh, gw)
        obj = _sigmoid(t[:, :, 4])  # [N, A, H, W]
        # class probabilities are <= 1, so a cell below the floor on objectness alone cannot reach it.
        keep = obj >= floor
        image, anchor, row, col = np.nonzero(keep)
        cells = t[image, anchor, :, row, col]  # [K, 5 + C]
        s, stride = np.float32(head.scale_x_y), np.float32(head.stride)
        x = (_sigmoid(cells[:, 0]) * s - (s - 1) / 2 + col.astype(np.float32)) * stride
        y = (_sigmoid(cells[:, 1]) * s - (s - 1) / 2 + row.astype(np.float32)) * stride
        anchors = np.asarray(head.anchors, np.float32)[anchor]
        with np.errstate(over="ignore"):
            wh = np.exp(cells[:, 2:4]) * anchors
        probs = _sigmoid(cells[:, 5:]) * obj[keep][:, None]
        class_ids = probs.argmax(axis=1)
        scores = probs[np.arange(probs.shape[0]), class_ids]
        ok = scores >= floor
        boxes = _xyxy(np.concatenate([x[:, None], y[:, None], wh], axis=1)[ok])
        parts.append((image[ok], boxes, scores[ok], class_ids[ok]))
    image, boxes, scores, class_ids = (np.concatenate(p) for p in zip(*parts, strict=True))
    order = np.argsort(image, kind="stable")  # image-major, heads in config order within an image
    return _per_image(maps[0].shape[0], image[order], boxes[order], scores[order], class_ids[order])


def decode_yolov8(outputs: Mapping[str, np.ndarray], config: ModelConfig, floor: float) -> list[Candidates]:
    (out,) = _arrays("yolov8", outputs, config)
    transposed = config.box_layout == CLS_TRANSPOSED
    # max over classes is a cheap reduction (3.6 ms for 16x84x8400) where argmax costs ~7x that: argmax survivors only.
    scores = out[:, 4:, :].max(axis=1) if transposed else out[:, :, 4:].max(axis=2)  # [N, boxes]
    image, box = np.nonzero(scores >= floor)
    rows = out[image, :, box] if transposed else out[image, box, :]  # [K, 4 + C]
    return _per_image(out.shape[0], image, _xyxy(rows[:, :4]), scores[image, box], rows[:, 4:].argmax(axis=1))


def decode_ssd(outputs: Mapping[str, np.ndarray], config: ModelConfig, floor: float) -> list[Candidates]:
    boxes, scores, classes, count = _arrays("ssd", outputs, config)
    n, k = scores.shape
    valid = np.arange(k)[None, :] < np.clip(np.rint(count), 0, k).astype(np.int64)[:, None]
    class_ids = np.rint(classes).astype(np.int64) - config.class_id_offset
    bad = valid & ((class_ids < 0) | (class_ids >= config.num_classes))
    if bad.any():
        # A config/model mismatch (usually class_id_offset), not a property of one image: fail loudly.
        raise DecoderError(f"ssd: class id {float(classes[bad][0])} is outside the {config.num_classes} class names "
                           f"with class_id_offset={config.class_id_offset}")
    image, j = np.nonzero(valid & (scores >= floor))
    size = np.asarray([config.input.width, config.input.height] * 2, np.float32)
    xyxy = boxes[image, j][:, [1, 0, 3, 2]].astype(np.float32) * size
    return _per_image(n, image, xyxy, scores[image, j], class_ids[image, j])


DECODERS: dict[str, Decoder] = {
    "darknet_yolo": decode_darknet_yolo,
    "darknet_yolo_raw": decode_darknet_yolo_raw,
    "yolov5": decode_yolov5,
    "yolov8": decode_yolov8,
    "ssd": decode_ssd,
}


# --------------------------------------------------------------------------- entry points


def decoder_for(config: ModelConfig) -> Decoder:
    try:
        return DECODERS[config.decoder]
    except KeyError as exc:
        raise DecoderError(f"unknown decoder family {config.decoder!r}; known: {sorted(DECODERS)}") from exc


def best(candidates: Candidates, limit: int) -> Candidates:
    """At most ``limit`` highest-scoring candidates, still in model order (equal scores: earlier wins).

    Greedy NMS on the result gives the same boxes as NMS on all candidates, up to ``limit`` of them,
    because only lower-scoring boxes are dropped.
    """
    if len(candidates) <= limit:
        return candidates
    top = np.argsort(-candidates.scores, kind="stable")[:limit]
    return candidates.take(np.sort(top))


def decode_outputs(outputs: Mapping[str, np.ndarray], config: ModelConfig, floor: float,
                   max_candidates: int = 1000) -> list[Candidates]:
    """Decode with the config's family, keeping at most ``max_candidates`` best per image (which bounds
    what one image can cost downstream, e.g. the size of a record carrying its candidates)."""
    if not 0.0 <= floor <= 1.0:
        raise DecoderError(f"score floor must be within 0..1, got {floor}")
    if max_candidates < 1:
        raise DecoderError(f"max_candidates must be at least 1, got {max_candidates}")
    return [best(c, max_candidates) for c in decoder_for(config)(outputs, config, floor)]

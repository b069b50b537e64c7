"""The declarative description of one model version (``config.json`` beside ``model.onnx``).

Everything the pre- and post-processing stages need to use a model travels here, so that no stage
hard-codes sizes, class names or decoder constants: the pipeline reads the config of the version it
serves.  The file is plain JSON so that tools in other languages can read it too.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
MODEL_FILE = "model.onnx"


class ModelConfigError(ValueError):
    """A model config file is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class InputSpec:
    """The model input contract.

    ``images``: float32 ``[N, 3, height, width]`` (NCHW), RGB channel order, values ``pixel / 255``
    (``scale``) in 0..1, the image letterboxed (aspect kept, centred, padded with ``pad_value`` per
    uint8 channel) to ``width x height``.  N is dynamic, 1..``max_batch``.
    """

    name: str
    width: int
    height: int
    layout: str = "NCHW"
    color: str = "RGB"
    dtype: str = "float32"
    scale: float = 1.0 / 255.0
    pad_value: int = 128  # darknet's letterbox fills with 0.5, i.e. 127.5 in uint8


@dataclass(frozen=True)
class YoloHeadSpec:
    """One darknet yolo layer: which anchors it uses and on which grid."""

    mask: tuple[int, ...]
    anchors: tuple[tuple[float, float], ...]  # (w, h) in input pixels, only this head's anchors
    stride: int
    grid: tuple[int, int]  # (height, width) cells
    scale_x_y: float


@dataclass(frozen=True)
class OutputSpec:
    """One output tensor.  ``shape`` uses ``"N"`` for the dynamic batch axis."""

    name: str
    shape: tuple[int | str, ...]
    description: str


@dataclass(frozen=True)
class Provenance:
    source_package: str
    source_version: str
    source_files: tuple[str, ...]
    weights_sha256: str
    cfg_sha256: str
    onnx_sha256: str
    converter_version: str
    opset: int


@dataclass(frozen=True)
class ModelConfig:
    name: str
    decoder: str  # decoder family, e.g. "darknet_yolo"
    input: InputSpec
    outputs: tuple[OutputSpec, ...]
    class_names: tuple[str, ...]
    heads: tuple[YoloHeadSpec, ...]
    max_batch: int
    provenance: Provenance
    # Decoded output columns: x, y, w, h (input pixels, box centre), objectness, class probabilities.
    # Other families use other layouts; model_store.serving.decoders lists which layouts each family accepts.
    box_layout: str = "cxcywh_obj_cls"
    # Subtracted from class ids a model emits as values (SSD's detection_classes) to index class_names:
    # 1 for TF Object Detection API exports, whose label ids start at 1 (0 is background).
    class_id_offset: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_boxes(self) -> int:
        return sum(len(h.mask) * h.grid[0] * h.grid[1] for h in self.heads)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        try:
            return cls(
                name=data["name"],
                decoder=data["decoder"],
                input=InputSpec(**data["input"]),
                outputs=tuple(OutputSpec(o["name"], tuple(o["shape"]), o["description"]) for o in data["outputs"]),
                class_names=tuple(data["class_names"]),
                heads=tuple(
                    YoloHeadSpec(
                        mask=tuple(h["mask"]),
                        anchors=tuple((float(w), float(hh)) for w, hh in h["anchors"]),
                        stride=int(h["stride"]),
                        grid=(int(h["grid"][0]), int(h["grid"][1])),
                        scale_x_y=float(h["scale_x_y"]),
                    )
                    for h in data["heads"]
                ),
                max_batch=int(data["max_batch"]),
                provenance=Provenance(**{**data["provenance"],
                                         "source_files": tuple(data["provenance"]["source_files"])}),
                box_layout=data.get("box_layout", "cxcywh_obj_cls"),
                class_id_offset=int(data.get("class_id_offset", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelConfigError(f"model config is malformed: {exc}") from exc

    def save(self, path: Path) -> None:
        """Write atomically, so a reader never sees half a config."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelConfigError(f"cannot read model config {path}: {exc}") from exc
        return cls.from_dict(data)

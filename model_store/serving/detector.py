"""The in-process detector: one ONNX Runtime session and its config running every step of the pipeline.

    image (BGR uint8, any size)
      -> letterbox            uint8 [3, H, W] RGB, plus (scale, pad) to undo it later     (imaging.letterbox)
      -> to_model_input       float32 [N, 3, H, W], 0..1          (batched)
      -> session.run          the model's outputs by name
      -> decode_outputs       per image: candidates above the threshold, xyxy in input pixels (decoders)
      -> nms                  class-aware greedy NMS                                        (boxes)
      -> unletterbox          xyxy in original image pixels
      -> Detection objects

The streaming pipeline runs the same functions in separate stages (preprocess ships the uint8 letterboxed
tensor, inference batches and runs, postprocess decodes); ``Detector`` chains them in one process for the
detect CLI (``model_store.tools.detect``), the evaluation, the release gate, tests and benchmarks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from imaging.letterbox import letterbox, to_model_input
from model_store.serving.boxes import Candidates, Detection, nms, to_detections, unletterbox
from model_store.serving.config import CONFIG_FILE, MODEL_FILE, ModelConfig
from model_store.serving.decoders import decode_outputs
from model_store.serving.session import SessionSettings, create_session


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

"""The release gate a version passes on push.

Structural checks (hard: a failure refuses the push, the model could not be served at all):
  onnx          the file parses and ``onnx.checker`` accepts it;
  session       ONNX Runtime opens it;
  input         its input is the config's (name, float32 [N, 3, H, W] with a dynamic batch axis);
  outputs       a batch of 2 runs and its outputs fit the decoder family's output-shape contract.
Quality checks (soft: the version is stored with gate FAILED; promote/canary refuse it unless --force):
  map           mAP@0.5 on the evaluation set is at most ``gate_max_map_drop`` below production's;
  latency       the P95 of single-image model latency (batch 1, this host) is within ``gate_p95_budget_ms``.

The report (every check with its figures) is stored with the version (gate.json, model_versions).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from imaging.letterbox import letterbox, to_model_input
from model_store.control.registry import GateRefused, VersionInfo
from model_store.serving.config import ModelConfig


def _check(name: str, passed: bool, detail: str, **figures: Any) -> dict[str, Any]:
    return {"name": name, "passed": bool(passed), "detail": detail, **figures}


def structural_checks(model_file: Path, config: ModelConfig) -> tuple[list[dict[str, Any]], Any]:
    """The hard checks; returns them and the open session. Raises GateRefused at the first failure."""
    # ONNX Runtime loads only when a version is gated: infra/models_cmd.py imports this module, and its commands that
    # gate nothing (`detectflow models list`, promote, ...) start without it.
    import onnx
    import onnxruntime as ort

    from model_store.serving.decoders import DecoderError, check_output_contract  # with ONNX Runtime, as above

    checks: list[dict[str, Any]] = []

    def refuse(name: str, detail: str) -> GateRefused:
        checks.append(_check(name, False, detail))
        return GateRefused(f"{name}: {detail}", {"passed": False, "checks": checks})

    try:
        proto = onnx.load(str(model_file))
        onnx.checker.check_model(proto)
    except Exception as exc:  # onnx raises DecodeError, ValidationError, ... on corrupt files
        raise refuse("onnx", f"not a valid ONNX model: {type(exc).__name__}: {str(exc)[:300]}") from exc
    checks.append(_check("onnx", True, f"opset {max((o.version for o in proto.opset_import), default=0)}, "
                                       f"{len(proto.graph.node)} nodes"))
    del proto
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(model_file), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's pybind exception types have no common base
        raise refuse("session", f"ONNX Runtime cannot open it: {str(exc)[:300]}") from exc
    checks.append(_check("session", True, "opens on CPUExecutionProvider"))
    spec = config.input
    inputs = {i.name: i for i in session.get_inputs()}
    got = inputs.get(spec.name)
    if got is None:
        raise refuse("input", f"no input named {spec.name!r} (the model has {sorted(inputs)})")
    shape = list(got.shape)
    if got.type != "tensor(float)" or len(shape) != 4 or shape[1:] != [3, spec.height, spec.width] \
            or (isinstance(shape[0], int) and shape[0] != -1):
        raise refuse("input", f"{spec.name} is {got.type} {shape}; the config says float [N, 3, {spec.height}, "
                              f"{spec.width}] with a dynamic N")
    checks.append(_check("input", True, f"{spec.name} float {shape}"))
    names = [o.name for o in session.get_outputs()]
    try:
        outputs = session.run(names, {spec.name: np.zeros((2, 3, spec.height, spec.width), np.float32)})
        check_output_contract(config, {n: np.shape(a) for n, a in zip(names, outputs, strict=True)})
    except DecoderError as exc:
        raise refuse("outputs", f"outputs do not fit decoder {config.decoder!r}: {exc}") from exc
    except Exception as exc:  # a run that fails on a well-formed batch
        raise refuse("outputs", f"a batch of 2 does not run: {str(exc)[:300]}") from exc
    checks.append(_check("outputs", True, f"{config.decoder}: " + ", ".join(
        f"{n} {list(np.shape(a))}" for n, a in zip(names, outputs, strict=True))))
    return checks, session


def latency_ms(session: Any, config: ModelConfig, images: list[np.ndarray], rounds: int) -> list[float]:
    """Model latency of single images (preprocessed outside the timing), ``rounds`` passes over ``images``."""
    spec = config.input
    batches = []
    for image in images:
        tensor, _, _ = letterbox(image, (spec.width, spec.height), spec.pad_value)
        batches.append(to_model_input([tensor], spec.scale))
    names = [o.name for o in session.get_outputs()]
    session.run(names, {spec.name: batches[0]})  # warm-up
    samples = []
    for _ in range(max(1, rounds)):
        for batch in batches:
            t0 = time.perf_counter()
            session.run(names, {spec.name: batch})
            samples.append((time.perf_counter() - t0) * 1000)
    return samples


def run_gate(model_file: Path, config: ModelConfig, production: VersionInfo | None, *, eval_dir: Path,
             max_map_drop: float, p95_budget_ms: float, rounds: int = 3) -> dict[str, Any]:
    """The gate report: ``passed`` (all checks), ``checks``, and ``metrics`` to store with the version."""
    # the detector and the evaluation load ONNX Runtime: only when gating, as in structural_checks
    from model_store.serving.boxes import DetectError
    from model_store.serving.decoders import DecoderError
    from model_store.serving.detector import Detector
    from model_store.tools.evaluate import EvalError, evaluate, load_ground_truth, load_images

    checks, session = structural_checks(model_file, config)
    try:
        report = evaluate(Detector(session, config), eval_dir)
    except (DecoderError, DetectError, EvalError, ValueError) as exc:
        checks.append(_check("map", False, f"the evaluation set cannot be scored: {exc}"))
        raise GateRefused(f"map: evaluation failed: {exc}", {"passed": False, "checks": checks}) from exc
    metrics: dict[str, Any] = {"map50": report.map50, "map50_95": report.map50_95, "eval_images": report.images,
                               "eval_set": report.eval_set}
    reference: Mapping[str, Any] = production.metrics if production is not None else {}
    if "map50" in reference:
        floor = float(reference["map50"]) - max_map_drop
        checks.append(_check("map", report.map50 >= floor,
                             f"mAP@0.5 {report.map50:.3f} vs production v{production.version if production else '-'} "
                             f"{float(reference['map50']):.3f} (floor {floor:.3f})", map50=report.map50,
                             production_map50=float(reference["map50"]), floor=floor))
    else:
        checks.append(_check("map", True, f"mAP@0.5 {report.map50:.3f}; no production version to compare with",
                             map50=report.map50))
    doc = load_ground_truth(eval_dir)
    samples = latency_ms(session, config, load_images(eval_dir, doc), rounds)
    p50, p95 = (float(np.percentile(samples, q)) for q in (50, 95))
    metrics.update({"p50_ms": p50, "p95_ms": p95, "latency_samples": len(samples)})
    checks.append(_check("latency", p95 <= p95_budget_ms,
                         f"P95 {p95:.1f} ms (P50 {p50:.1f}) over {len(samples)} single-image runs; budget "
                         f"{p95_budget_ms:g} ms", p95_ms=p95, p50_ms=p50, budget_ms=p95_budget_ms))
    return {"passed": all(c["passed"] for c in checks), "checks": checks, "metrics": metrics}


def gate_runner(settings: Any, eval_dir: Path) -> Any:
    """A registry GateRunner with the lifecycle settings (``settings``: config.LifecycleSettings)."""
    def run(model_file: Path, config: ModelConfig, production: VersionInfo | None) -> dict[str, Any]:
        return run_gate(model_file, config, production, eval_dir=eval_dir, max_map_drop=settings.gate_max_map_drop,
                        p95_budget_ms=settings.gate_p95_budget_ms, rounds=settings.gate_latency_rounds)
    return run

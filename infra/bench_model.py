"""Which model a bench's pipeline serves: the default model, or (``--int8``) its static INT8 version.

With ``--int8`` the default model is quantised as `detectflow model quantize` does it (into
``<home>/build/yolov4-tiny-int8``, reused when already made from the same source), pushed through the
release gate and promoted, and the bench's roles serve it by default; the baseline, the model's CPU cost
(infra/bench_cost.py) and the plain server load that same folder, so every ratio compares like with like.

The INT8 version is registered as a model of its own, ``<default>-int8``, not as a version of the default
model: the registry keeps one routing row per model name (Cassandra), whatever the topic prefix; only its
publication on `models` is per prefix. Promoting an INT8 version of the default model would switch
production for every deployment, and the next ``bootstrap_default_model`` on any prefix (the demo, every
bench, other users' runs included) would publish it there. Its release gate compares its mAP with the
default model's production version, as a new version of that model would be. It stays in the registry
after the run, like the default model's v1: pushes go by content, so the next run reuses it, and a purge
would let a later push take version 1 again while the roles' local copies still hold the old files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config import PipelineSettings, StackSettings
from infra.demo import bootstrap_default_model
from infra.models_cmd import actor_name
from model_store.control.registry import RegistryError, VersionInfo, connect_registry
from model_store.tools.evalset import ensure_eval_set
from model_store.tools.gate import gate_runner
from model_store.tools.quantize import STATIC, QuantizeError, default_out_dir, quantize_version, read_images
from model_store.tools.samples import ensure_samples

INT8_SUFFIX = "-int8"
FP32 = "FP32"
STATIC_INT8 = "static INT8"
RUNS_METRIC = "detectflow_inference_batch_size_count"  # the inference role's model runs, by model and version


class BenchModelError(RuntimeError):
    """The model a bench asked for cannot be served (quantisation failed, the release gate refused it)."""


@dataclass(frozen=True)
class ServedModel:
    """The model the bench's pipeline routes by default, and the folder its in-process figures load."""

    name: str
    version: int
    precision: str  # FP32 | STATIC_INT8
    model_dir: Path  # the baseline, the model cost and the plain server load this
    gate: str = ""  # the release gate's verdict, where the bench pushed it
    source: str = ""  # what it was made from ("yolov4-tiny v1"), for a derived model


def int8_name(default_model: str) -> str:
    return f"{default_model}{INT8_SUFFIX}"


def label(model: ServedModel) -> str:
    """``yolov4-tiny-int8 v1 (static INT8)``: what the header line names."""
    return f"{model.name} v{model.version} ({model.precision})"


def describe(model: ServedModel, prefix: str) -> str:
    """The header line naming what is measured."""
    made = f"{model.precision} of {model.source}" if model.source else model.precision
    gate = f", release gate {model.gate}" if model.gate else ""
    return (f"model measured: {model.name} v{model.version} ({made}{gate}), production on the "
            f"bench's prefix {prefix}; the baseline and the model cost (and bench sync's plain server) load "
            f"{model.model_dir}")


def runs_by_version(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """Model runs between two scrapes of the inference role's /metrics, by ``"<model> v<version>"``."""
    out: dict[str, float] = {}
    for key, value in after.items():
        m = re.fullmatch(rf"{RUNS_METRIC}\{{(.*)\}}", key)
        if m is None:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        runs = value - before.get(key, 0.0)
        if runs > 0:
            name = f"{labels.get('model', '?')} v{labels.get('version', '?')}"
            out[name] = out.get(name, 0.0) + runs
    return out


def format_runs(runs: Mapping[str, float], served: ServedModel) -> str:
    wanted = f"{served.name} v{served.version}"
    parts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(runs.items())) or "none"
    ok = set(runs) == {wanted}
    return f"model runs by version (the inference role's metrics): {parts} ({'all' if ok else 'NOT all'} {wanted})"


# ---------------------------------------------------------------------------------------------- serving


def serve(settings: PipelineSettings, stack: StackSettings, *, int8: bool) -> ServedModel:
    """Route the model on ``settings``' topic prefix (production there) and say which it is. The default model
    (converted) is bootstrapped either way: it is the INT8 version's source and its gate's reference."""
    routing = bootstrap_default_model(settings, stack, quiet=True)
    fp32_dir = settings.models_dir / settings.default_model / "1"
    fp32 = ServedModel(settings.default_model, routing.production or 1, FP32, fp32_dir)
    return _serve_int8(settings, stack, fp32) if int8 else fp32


def _serve_int8(settings: PipelineSettings, stack: StackSettings, fp32: ServedModel) -> ServedModel:
    out = default_out_dir(stack.home, STATIC)
    try:
        # The same source, method and calibration images as `detectflow model quantize`: its output is reused.
        images = read_images(ensure_samples(stack.samples_dir, stack.cache_dir))
        quantize_version(fp32.model_dir, out, method=STATIC, calibration_images=images)
    except QuantizeError as exc:
        raise BenchModelError(f"cannot build the INT8 model: {exc}") from exc
    name, actor = int8_name(fp32.name), actor_name()
    registry = connect_registry(settings)  # publishes on the bench's prefix only
    try:
        reference = registry.store.version(fp32.name, fp32.version)
        run_gate = gate_runner(settings.lifecycle, ensure_eval_set(stack))

        def gate(model_file: Path, config: Any, _own_production: VersionInfo | None) -> dict[str, Any]:
            return run_gate(model_file, config, reference)  # mAP against the FP32 model it replaces

        outcome = registry.push(name, out, actor=actor, gate=gate)
        if outcome.gate_status != "PASSED":
            failed = [c["name"] for c in outcome.report.get("checks", []) if not c.get("passed")]
            raise BenchModelError(f"{name} v{outcome.version} failed its release gate ({', '.join(failed)}); "
                                  "a bench measures only what could be promoted")
        routing = registry.promote(name, outcome.version, actor=actor)
    except RegistryError as exc:
        raise BenchModelError(f"cannot serve {name}: {exc}") from exc
    finally:
        registry.close()
    return ServedModel(name, routing.production or outcome.version, STATIC_INT8, out, outcome.gate_status,
                       f"{fp32.name} v{fp32.version}")

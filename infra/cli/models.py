"""`detectflow model|models|eval`: the default model's files, the model registry, and evaluation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from config import StackSettings
from infra.cli.base import argument, command, group, pass_stack_settings

PATH = click.Path(path_type=Path)
# model_store.tools.quantize's METHODS and DEFAULT_METHOD, and model_store.tools.evaluate's DEFAULT_CONF, written
# out so that `--help` does not load ONNX Runtime (tests/unit/test_cli.py checks that they agree).
QUANTIZE_METHODS = ("static", "dynamic")
QUANTIZE_DEFAULT_METHOD = "static"
EVAL_DEFAULT_CONF = 0.001


@group("model", help="the default model")
def model() -> None:
    """The `model` sub-commands."""


@model.command("convert", help="convert the darknet YOLOv4-tiny into ONNX + config.json")
@click.option("--out", type=PATH, default=None, help="output folder (default: <home>/models/yolov4-tiny/1)")
@pass_stack_settings
def model_convert(settings: StackSettings, out: Path | None) -> int:
    from model_store.tools.convert import run_cli  # imported on use: --help stays fast

    return run_cli(out=out)


@model.command("quantize", help="write an INT8 version of the model (onnxruntime.quantization)")
@click.option("--method", type=click.Choice(QUANTIZE_METHODS), default=QUANTIZE_DEFAULT_METHOD,
              help=f"default {QUANTIZE_DEFAULT_METHOD}")
@click.option("--source", type=PATH, default=None, metavar="DIR",
              help="model version folder to quantise (default: <home>/models/yolov4-tiny/1, converted first if "
                   "needed)")
@click.option("--out", type=PATH, default=None, metavar="DIR",
              help="output folder (default: <home>/build/yolov4-tiny-int8, -dynamic appended for dynamic)")
@pass_stack_settings
def model_quantize(settings: StackSettings, method: str, source: Path | None, out: Path | None) -> int:
    from model_store.tools.quantize import run_cli  # imported on use: --help stays fast

    return run_cli(method=method, source=source, out=out)


@command("eval", help="mAP of the model on the labelled evaluation set")
@click.option("--model", "model_dir", type=PATH, default=None,
              help="model folder (default: convert into the state dir)")
@click.option("--conf", type=float, default=EVAL_DEFAULT_CONF, help=f"score threshold (default {EVAL_DEFAULT_CONF})")
@click.option("--iou", type=float, default=0.45, help="NMS IoU threshold (default 0.45)")
@click.option("--batch", type=int, default=1, help="images per detector call (default 1)")
@click.option("--compare", type=PATH, multiple=True, metavar="DIR",
              help="also score this model folder on the same images and print a comparison (repeatable)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON (a list with --compare)")
@pass_stack_settings
def eval_command(settings: StackSettings, model_dir: Path | None, conf: float, iou: float, batch: int,
                 compare: tuple[Path, ...], as_json: bool) -> int:
    from model_store.tools.evaluate import run_cli  # imported on use: --help stays fast

    return run_cli(model_dir=model_dir, conf=conf, iou=iou, batch=batch, compare=compare, as_json=as_json)


@group("models", help="the model registry: versions, rollout, rollback, shadow comparison")
def models() -> None:
    """The `models` sub-commands."""


def _actor(callback: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--actor", default=None,
                        help="who is acting, for the audit log (default user@host)")(callback)


def _switch(callback: Callable[..., Any]) -> Callable[..., Any]:
    """promote's and canary's: the release gate and the wait for READY."""
    callback = click.option("--no-wait", is_flag=True,
                            help="do not wait for an inference process to report READY")(callback)
    return click.option("--force", is_flag=True, help="override a failed release gate (audited)")(callback)


def _run_models(settings: StackSettings, action: str, name: str | None = None, **params: Any) -> int:
    from infra.models_cmd import run_models  # imported on use: --help stays fast

    return run_models(settings, action, name, **params)


@models.command("list", help="models, versions, their gate and where they serve")
@click.option("--json", "as_json", is_flag=True)
@_actor
@pass_stack_settings
def models_list(settings: StackSettings, as_json: bool, actor: str | None) -> int:
    return _run_models(settings, "list", as_json=as_json, actor=actor)


@models.command("push", help="add a version (release gate: ONNX checker, output contract, mAP, P95 latency)")
@argument("name")
@argument("source", required=False, type=PATH,
          help="folder with model.onnx and config.json (default: the converted default model)")
@_actor
@pass_stack_settings
def models_push(settings: StackSettings, name: str, source: Path | None, actor: str | None) -> int:
    return _run_models(settings, "push", name, source=source, actor=actor)


@models.command("promote", help="make a version production (100% of unpinned traffic)")
@argument("name")
@argument("version", type=int)
@_switch
@_actor
@pass_stack_settings
def models_promote(settings: StackSettings, name: str, version: int, force: bool, no_wait: bool,
                   actor: str | None) -> int:
    return _run_models(settings, "promote", name, version=version, force=force, no_wait=no_wait, actor=actor)


@models.command("canary", help="route PERCENT of unpinned traffic (by request-id hash) to a version")
@argument("name")
@argument("version", type=int)
@argument("percent", type=float)
@click.option("--no-guardrail", is_flag=True,
              help="an A/B split: no automatic rollback on error-rate or latency breaches")
@_switch
@_actor
@pass_stack_settings
def models_canary(settings: StackSettings, name: str, version: int, percent: float, no_guardrail: bool, force: bool,
                  no_wait: bool, actor: str | None) -> int:
    return _run_models(settings, "canary", name, version=version, percent=percent, no_guardrail=no_guardrail,
                       force=force, no_wait=no_wait, actor=actor)


@models.command("shadow", help="run a version as shadow (own consumer group -> detections.shadow), or 'off'")
@argument("name")
@argument("version", help="a version number, or off")
@_actor
@pass_stack_settings
def models_shadow(settings: StackSettings, name: str, version: str, actor: str | None) -> int:
    return _run_models(settings, "shadow", name, version=version, actor=actor)


@models.command("rollback", help="abort the canary, or restore the previous production version")
@argument("name")
@click.option("--reason", default=None)
@_actor
@pass_stack_settings
def models_rollback(settings: StackSettings, name: str, reason: str | None, actor: str | None) -> int:
    return _run_models(settings, "rollback", name, reason=reason, actor=actor)


@models.command("retire", help="stop offering a version (not production, canary or shadow)")
@argument("name")
@argument("version", type=int)
@_actor
@pass_stack_settings
def models_retire(settings: StackSettings, name: str, version: int, actor: str | None) -> int:
    return _run_models(settings, "retire", name, version=version, actor=actor)


@models.command("purge", help="delete a model from the registry: files and rows (audited)")
@argument("name")
@_actor
@pass_stack_settings
def models_purge(settings: StackSettings, name: str, actor: str | None) -> int:
    return _run_models(settings, "purge", name, actor=actor)


@models.command("compare", help="shadow agreement with production (IoU 0.5 per class, score deltas, latency)")
@argument("name")
@click.option("--json", "as_json", is_flag=True)
@_actor
@pass_stack_settings
def models_compare(settings: StackSettings, name: str, as_json: bool, actor: str | None) -> int:
    return _run_models(settings, "compare", name, as_json=as_json, actor=actor)

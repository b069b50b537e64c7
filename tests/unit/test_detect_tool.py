"""`python -m model_store.tools.detect` (model_store/tools/detect.py): the flags, defaults and help its argparse parser
had, its exit codes, and a run on a sample image."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from model_store.tools import detect
from model_store.tools.detect import PROG, command, main

REPO = Path(__file__).resolve().parents[2]
# flag -> (default, type, help, metavar), as the argparse parser declared them.
OPTIONS: dict[str, tuple[Any, type | None, str | None, str | None]] = {
    "--model": (None, Path, "model folder (default: convert into the state dir)", None),
    "--conf": (0.25, float, None, None),
    "--iou": (0.45, float, None, None),
    "--threads": (0, int, "intra-op threads (0: ORT default)", None),
    "--spin": (False, None, "idle ORT threads busy-wait (ORT's default)", None),
    "--bench": (0, int, "also time batch 1 and 4", "REPEATS"),
}


def _type(param: click.Parameter) -> type | None:
    t = param.type
    if isinstance(t, click.Path):
        return Path if t.type is Path else None
    return {click.types.FloatParamType: float, click.types.IntParamType: int}.get(type(t))


def test_the_flags_keep_their_defaults_types_and_help() -> None:
    options = {p.opts[0]: p for p in command.params if isinstance(p, click.Option)}
    assert set(options) == set(OPTIONS)
    with command.make_context(PROG, [], resilient_parsing=True) as ctx:
        defaults = dict(ctx.params)
    for flag, (default, kind, help_line, metavar) in OPTIONS.items():
        got = options[flag]
        assert defaults[got.name] == default, flag
        assert (got.help, got.metavar, got.required, got.multiple) == (help_line, metavar, False, False), flag
        assert got.is_flag if flag == "--spin" else _type(got) is kind, flag
    (images,) = [p for p in command.params if isinstance(p, click.Argument)]
    assert (images.name, images.nargs, images.required, _type(images)) == ("images", -1, False, Path)
    assert defaults["images"] == ()


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_shows_the_description_every_flag_and_the_images_argument(flag: str) -> None:
    result = CliRunner().invoke(command, [flag], prog_name=PROG)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: {PROG} [OPTIONS] [IMAGES]...")
    text = "".join(result.output.split())  # wrapped to the terminal's width
    assert "".join((detect.__doc__ or "").splitlines()[0].split()) in text
    assert "IMAGES:imagefiles(default:thesampleimages)" in text
    for flag_name, (_, _, help_line, metavar) in OPTIONS.items():
        assert flag_name in text and "".join((help_line or "").split()) in text and (metavar or "") in text


def test_the_flags_reach_run_and_its_code_is_the_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[list[Path], dict[str, Any]]] = []
    real = inspect.signature(detect.run)

    def run(paths: list[Path], **kwargs: Any) -> int:
        real.bind(paths, **kwargs)  # what the real run takes, every keyword given
        calls.append((paths, kwargs))
        return 5

    monkeypatch.setattr(detect, "run", run)
    assert main([]) == 5
    assert calls[-1] == ([], {"model_dir": None, "conf": 0.25, "iou": 0.45, "threads": 0, "spin": False, "bench": 0})
    assert main(["a.jpg", "b.png", "--model", "m", "--conf", "0.5", "--iou", "0.3", "--threads", "2", "--spin",
                 "--bench", "20"]) == 5
    assert calls[-1] == ([Path("a.jpg"), Path("b.png")],
                         {"model_dir": Path("m"), "conf": 0.5, "iou": 0.3, "threads": 2, "spin": True, "bench": 20})


@pytest.mark.parametrize(("argv", "said"), [(["--conf", "high"], f"Usage: {PROG} "),
                                            (["--threads", "1.5"], f"Usage: {PROG} "),
                                            (["--nosuchflag"], f"Usage: {PROG} "),
                                            # click reports a missing value without the usage line
                                            (["--bench"], "Error: Option '--bench' requires an argument.")])
def test_a_usage_error_exits_2(argv: list[str], said: str, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(detect, "run", lambda *a, **k: pytest.fail("the detector ran"))
    assert main(argv) == 2
    assert said in capsys.readouterr().err


@pytest.mark.parametrize("module", ["model_store.tools.detect", "model_store.tools.convert"])
def test_python_m_still_works(module: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", module, "-h"], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Usage: python -m {module} [OPTIONS]")
    proc = subprocess.run([sys.executable, "-m", module, "--nosuchflag"], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=120)
    assert proc.returncode == 2 and f"Usage: python -m {module}" in proc.stderr


def test_detect_prints_the_table_and_the_timings(default_model_converted: Path | None,
                                                  sample_images: dict[str, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    if default_model_converted is None:
        pytest.skip("the model package is not installed")
    assert main([str(sample_images["bus.jpg"]), "--model", str(default_model_converted), "--threads", "1",
                 "--bench", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("providers: ") and lines[1].split()[:3] == ["image", "class", "score"]
    classes = {line.split()[1] for line in lines[2:] if line.startswith("bus.jpg")}
    assert {"person", "bus"} <= classes
    assert [line.split(":")[0] for line in lines if line.startswith("batch ")] == ["batch 1", "batch 4"]

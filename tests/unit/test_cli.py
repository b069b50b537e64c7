"""The `detectflow` CLI (infra/cli/): every command, argument and flag the argparse CLI had is still there with its
default, choices and help (tests/unit/cli_surface.json was extracted from the argparse parsers before the port to
click); every help page renders; `--help` loads none of the pipeline's dependencies; exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from infra.cli import cli, main
from infra.cli.base import HelpedArgument, ParsedBy

SURFACE: dict[str, dict[str, Any]] = json.loads((Path(__file__).parent / "cli_surface.json").read_text())
NEW_COMMANDS = {"detectflow config", "detectflow config show"}
REPO = Path(__file__).resolve().parents[2]


def _resolve(path: str) -> click.Command:
    cmd: click.Command = cli
    for name in path.split()[1:]:
        assert isinstance(cmd, click.Group), f"{path}: {cmd.name} has no sub-commands"
        sub = cmd.get_command(click.Context(cmd), name)
        assert sub is not None, f"{path}: no command {name!r}"
        cmd = sub
    return cmd


def _tree(cmd: click.Command = cli, path: str = "detectflow") -> dict[str, click.Command]:
    out = {path: cmd}
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            out |= _tree(sub, f"{path} {name}")
    return out


def _type_name(param: click.Parameter) -> str | None:
    t = param.type
    if isinstance(t, click.types.IntParamType):
        return "int"
    if isinstance(t, click.types.FloatParamType):
        return "float"
    if isinstance(t, click.Path):
        assert t.type is Path, f"{param.name}: paths arrive as pathlib.Path, as argparse's type=Path gave them"
        return "Path"
    if isinstance(t, ParsedBy):
        return t.parse.__name__
    return None


def _defaults(path: str, cmd: click.Command) -> dict[str, Any]:
    """The values a command's callback gets for what the command line leaves out."""
    with cmd.make_context(path, [], resilient_parsing=True) as ctx:
        return dict(ctx.params)


def test_the_command_tree_is_the_argparse_one_plus_config_show() -> None:
    assert set(_tree()) == set(SURFACE) | NEW_COMMANDS
    assert list(cli.commands) == [p.split()[1] for p in SURFACE if len(p.split()) == 2] + ["config"]


@pytest.mark.parametrize("path", list(SURFACE))
def test_every_command_keeps_its_arguments_flags_defaults_choices_and_help(path: str) -> None:
    want = SURFACE[path]
    cmd = _resolve(path)
    assert cmd.help == want["help"]
    arguments = [p for p in cmd.params if isinstance(p, click.Argument)]
    assert [a.name for a in arguments] == [a["name"] for a in want["arguments"]]
    for got, spec in zip(arguments, want["arguments"], strict=True):
        nargs, required = {None: (1, True), "?": (1, False), "*": (-1, False), "+": (-1, True)}[spec["nargs"]]
        assert (got.nargs, got.required) == (nargs, required), f"{path} {got.name}"
        assert _choices(got) == spec["choices"], f"{path} {got.name}"
        assert _type_name(got) == spec["type"], f"{path} {got.name}"
        assert isinstance(got, HelpedArgument) and got.help == spec["help"], f"{path} {got.name}"
    options = {tuple(sorted(p.opts)): p for p in cmd.params if isinstance(p, click.Option) and p.name != "help"}
    assert set(options) == {tuple(sorted(o["flags"])) for o in want["options"]}, path
    defaults = _defaults(path, cmd)
    for spec in want["options"]:
        got = options[tuple(sorted(spec["flags"]))]
        what = f"{path} {'/'.join(spec['flags'])}"
        assert (got.is_flag, got.multiple, got.required) == (spec["flag"], spec["multiple"], spec["required"]), what
        default = tuple(spec["default"] or ()) if spec["multiple"] else spec["default"]
        assert defaults[got.name] == default, what
        assert _choices(got) == spec["choices"], what
        assert _type_name(got) == spec["type"] or spec["flag"], what
        assert (got.help, got.metavar) == (spec["help"], spec["metavar"]), what


def _choices(param: click.Parameter) -> list[str] | None:
    return list(param.type.choices) if isinstance(param.type, click.Choice) else None


@pytest.mark.parametrize("path", sorted(set(SURFACE) | NEW_COMMANDS))
def test_every_help_page_renders_with_its_arguments_and_flags(path: str) -> None:
    argv = path.split()[1:]
    for flag in ("--help", "-h"):
        result = CliRunner().invoke(cli, [*argv, flag], prog_name="detectflow")
        assert result.exit_code == 0, result.output
        assert result.output.startswith(f"Usage: {path} ")
    cmd = _resolve(path)
    text = _squeezed(result.output)  # the help is wrapped to the terminal's width (at spaces and hyphens)
    assert _squeezed(cmd.help or "") in text
    for spec in SURFACE.get(path, {}).get("options", []):
        assert all(flag in text for flag in spec["flags"]), spec["flags"]
        assert spec["help"] is None or _squeezed(spec["help"]) in text, spec["help"]
    for spec in SURFACE.get(path, {}).get("arguments", []):
        assert spec["help"] is None or _squeezed(spec["help"]) in text, spec["help"]
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            assert _squeezed(f"{name} {sub.help}") in text  # the whole help line, not cut short


def _squeezed(text: str) -> str:
    return "".join(text.split())


def test_help_loads_none_of_the_pipelines_dependencies() -> None:
    """Each command imports its module when it runs: every help page stays fast (the argparse CLI loaded
    confluent-kafka, aiohttp and ONNX Runtime to print its usage)."""
    heavy = ["confluent_kafka", "aiohttp", "onnxruntime", "onnx", "cv2", "numpy", "cassandra", "minio", "fastavro",
             "jwt", "gateway", "processors", "model_store", "stream"]
    pages = [p.split()[1:] for p in sorted(set(SURFACE) | NEW_COMMANDS)]
    code = ("import contextlib, io, json, sys\nfrom infra.cli import main\n"
            f"for argv in {pages!r}:\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        assert main([*argv, '--help']) == 0, argv\n"
            f"print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_python_m_infra_cli_is_the_supervisors_way_in() -> None:
    """infra/supervisor.py starts each role as `python -m infra.cli run <role>`."""
    from infra.roles import SERVICES
    from infra.supervisor import Supervisor

    argv = Supervisor(SERVICES, Path("/nonexistent")).argv("scan")
    assert argv[1:] == ["-m", "infra.cli", "run", "scan"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([*argv[:3], "run", "--help"], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: detectflow run ") and all(role in proc.stdout for role in SERVICES)
    proc = subprocess.run([*argv[:3], "run", "nosuchrole"], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=60)
    assert proc.returncode == 2 and "nosuchrole" in proc.stderr


@pytest.mark.parametrize("argv", [[], ["nosuchcommand"], ["stack"], ["stack", "sideways"], ["models"],
                                  ["models", "promote", "m", "two"], ["stack", "logs", "-n", "x"],
                                  ["chaos", "--duration", "three minutes"], ["token"], ["detect"],
                                  ["bench", "sync", "--levels", "0"], ["dlq", "list", "--nosuchflag"]])
def test_a_usage_error_exits_2_with_the_usage_line(argv: list[str], monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import infra.bench_sync

    monkeypatch.setattr(infra.bench_sync, "run_bench_sync", lambda *a, **k: pytest.fail("the bench ran"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Usage: detectflow" in err


def test_a_bad_setting_exits_2_naming_the_variable(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import infra.demo

    monkeypatch.setattr(infra.demo, "run_demo", lambda *a, **k: pytest.fail("the demo ran"))
    monkeypatch.setenv("DETECTFLOW_KAFKA_PORT", "ninety")
    assert main(["demo", "--no-stack"]) == 2
    assert capsys.readouterr().err.startswith("detectflow: DETECTFLOW_KAFKA_PORT")


def test_a_stack_error_exits_2_and_ctrl_c_130(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import infra.demo
    from infra.stack.base import StackError

    def fail(*_: object, **__: object) -> int:
        raise StackError("kafka did not start")

    monkeypatch.setattr(infra.demo, "run_demo", fail)
    assert main(["demo"]) == 2
    assert capsys.readouterr().err == "detectflow: kafka did not start\n"

    def interrupted(*_: object, **__: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(infra.demo, "run_demo", interrupted)
    assert main(["demo", "--no-stack"]) == 130


def test_a_commands_exit_code_is_mains(monkeypatch: pytest.MonkeyPatch) -> None:
    import infra.demo

    seen: list[bool] = []
    monkeypatch.setattr(infra.demo, "run_demo", lambda settings, bring_up: seen.append(bring_up) or 1)
    assert main(["demo", "--no-stack"]) == 1 and seen == [False]


def test_the_models_arguments_reach_the_registry_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import infra.models_cmd

    calls: list[tuple[str, str | None, dict[str, Any]]] = []
    monkeypatch.setattr(infra.models_cmd, "run_models",
                        lambda settings, action, name=None, **kw: calls.append((action, name, kw)) or 0)
    assert main(["models", "canary", "yolo", "2", "12.5", "--no-guardrail", "--no-wait", "--actor", "ops"]) == 0
    assert calls[-1] == ("canary", "yolo", {"version": 2, "percent": 12.5, "no_guardrail": True, "force": False,
                                            "no_wait": True, "actor": "ops"})
    assert main(["models", "shadow", "yolo", "off"]) == 0
    assert calls[-1] == ("shadow", "yolo", {"version": "off", "actor": None})
    assert main(["models", "push", "yolo"]) == 0 and calls[-1][2]["source"] is None
    assert main(["models", "list", "--json"]) == 0 and calls[-1] == ("list", None, {"as_json": True, "actor": None})


def test_repeated_flags_collect(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                tmp_path: Path) -> None:
    import jwt

    monkeypatch.setenv("DETECTFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("DETECTFLOW_AUTH_DEV", "true")
    assert main(["token", "--tenant", "acme", "--scope", "admin", "--scope", "results:read"]) == 0
    claims = jwt.decode(capsys.readouterr().out.strip(), options={"verify_signature": False})
    assert sorted(claims["scope"].split()) == ["admin", "results:read"]


def test_config_show_is_registered() -> None:
    cmd = _resolve("detectflow config show")
    assert cmd.callback is not None and cmd.params == []  # no arguments or flags besides --help


def test_the_defaults_written_out_for_fast_help_agree_with_model_store() -> None:
    from infra.cli import models
    from model_store.tools.evaluate import DEFAULT_CONF
    from model_store.tools.quantize import DEFAULT_METHOD, METHODS, OUT_NAME

    assert (models.QUANTIZE_METHODS, models.QUANTIZE_DEFAULT_METHOD) == (METHODS, DEFAULT_METHOD)
    assert models.EVAL_DEFAULT_CONF == DEFAULT_CONF
    assert OUT_NAME in (_resolve("detectflow model quantize").params[2].help or "")  # --out


# The standalone benches' own command lines, as their argparse parsers declared them: flag -> (default, required).
BENCH_GPU_OPTIONS = {
    "--model-dir": (None, True), "--images": (None, False), "--batches": ([1, 8, 32, 64], False),
    "--iters": (200, False), "--seconds": (1.5, False), "--cpu-iters": (3, False), "--tax-seconds": (0.5, False),
    "--sections": (",".join(("ort-cpu", "ort-cuda", "ort-cuda-fp16", "ort-cuda-graph", "ort-trt", "torch", "tax")),
                   False),
    "--budget": ("", False), "--trt-cache": (Path(tempfile.gettempdir()) / "detectflow-trt-cache", False),
    "--torch-on-cpu": (False, False), "--nvidia-libs": (False, False), "--out": (Path("out/bench-gpu"), False)}
BENCH_PLAIN_OPTIONS = {"--port": (None, True), "--host": ("127.0.0.1", False), "--model-dir": (None, True),
                       "--threads": (0, False), "--cert": (None, False), "--key": (None, False)}


@pytest.mark.parametrize(("module", "want"), [("bench_gpu", BENCH_GPU_OPTIONS), ("bench_plain", BENCH_PLAIN_OPTIONS)])
def test_the_standalone_benches_keep_their_flags_and_defaults(module: str, want: dict[str, tuple[Any, bool]],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    monkeypatch.delenv("OUT", raising=False)
    cmd = {"bench_gpu": "bench_gpu", "bench_plain": "serve"}[module]
    command = getattr(importlib.import_module(f"infra.{module}"), cmd)
    options = {p.opts[0]: p for p in command.params if isinstance(p, click.Option)}
    assert set(options) == set(want)
    defaults = _defaults(f"python -m infra.{module}", command)
    for flag, (default, required) in want.items():
        assert (defaults[options[flag].name], options[flag].required) == (default, required), flag
    result = CliRunner().invoke(command, ["-h"], prog_name=f"python -m infra.{module}")
    assert result.exit_code == 0 and result.output.startswith(f"Usage: python -m infra.{module} [OPTIONS]")


def test_the_plain_server_parses_the_argv_the_sync_bench_starts_it_with() -> None:
    from infra.bench_plain import command, serve

    argv = command(8123, Path("/m/1"), 2, Path("c.pem"), Path("k.pem"))
    assert argv[1:3] == ["-m", "infra.bench_plain"]
    with serve.make_context("python -m infra.bench_plain", argv[3:]) as ctx:
        assert ctx.params == {"port": 8123, "host": "127.0.0.1", "model_dir": Path("/m/1"), "threads": 2,
                              "cert": Path("c.pem"), "key": Path("k.pem")}


@pytest.mark.parametrize("argv", [["--model-dir", "m", "--batches", "0,4"], ["--model-dir", "m", "--sections", "gpu"],
                                  ["--model-dir", "m", "--budget", "warp=3"], ["--batches", "1"]])
def test_bench_gpu_refuses_bad_flags_with_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from infra.bench_gpu import main

    assert main(argv) == 2
    assert "Usage: python -m infra.bench_gpu" in capsys.readouterr().err

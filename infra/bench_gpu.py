"""`python -m infra.bench_gpu`: one model version alone on a GPU, per execution provider and batch size.

The service's own pieces, measured per batch size: the session from ``model_store/serving/session.py``
(``create_session``), fed the float32 NCHW batch that ``imaging/letterbox.py`` ``to_model_input``
builds, its outputs decoded by ``model_store/serving/decoders.py`` ``decode_outputs``. Sections:

- ``ort-cpu``: ONNX Runtime's CPU provider, a few iterations, for reference;
- ``ort-cuda``: the CUDA provider with numpy in and out (what ``processors/inference.py`` does), with
  IO binding (input and output on the GPU, nothing copied) and with IO binding plus both copies;
- ``ort-cuda-fp16``: the same rows on an FP16 copy of the model made in memory by ONNX Runtime's own
  converter (``onnxruntime.transformers.float16``, input and output kept float32);
- ``ort-cuda-graph``: the CUDA provider with ``enable_cuda_graph`` (one session per batch size, IO
  binding, the graph replayed), FP32 and FP16, on device and with both copies;
- ``ort-trt``: the TensorRT provider, FP16, engine cache on disk; the first build is timed apart;
- ``torch``: the same ONNX graph and weights converted by onnx2torch and run by PyTorch on CUDA, FP32
  and FP16, CUDA graphs too. Not the service's runtime: a measured GPU figure for the same model where
  ONNX Runtime has no GPU provider;
- ``tax``: the inference stage's own CPU time per image around the model (``to_model_input`` and
  ``decode_outputs``, ``time.process_time()``), which a GPU does not take off the host.

``--nvidia-libs`` restarts the process with the ``lib`` folders of NVIDIA's pip wheels (``nvidia/cu13/lib``,
``nvidia/cudnn/lib``: what PyTorch installs) on ``LD_LIBRARY_PATH``, for an ``onnxruntime-gpu`` whose CUDA and
cuDNN come from there. ``docs/bench_gpu/README.md`` says how that build was carried to a machine without an index.

Every row records its error and the next one runs; each section stops at its own time budget. The
results go to ``OUT/bench_gpu.json`` and ``OUT/bench_gpu.txt`` after every section. Figures are the
median of timed calls after warm-up, one batch per call, synchronised per call (a GPU call includes
waiting for its result); ``cpu ms/img`` is this process's CPU time (all threads) over those calls.
"""

from __future__ import annotations

import ctypes.util
import glob
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click
import cv2
import numpy as np
import onnx
import onnxruntime as ort

from imaging.letterbox import letterbox, to_model_input
from infra.cli.base import CONTEXT_SETTINGS, ParsedBy, invoke
from model_store.serving.config import CONFIG_FILE, MODEL_FILE, ModelConfig
from model_store.serving.decoders import decode_outputs
from model_store.serving.session import CPU, CUDA, TENSORRT, SessionSettings, create_session, usable_providers

SECTIONS = ("ort-cpu", "ort-cuda", "ort-cuda-fp16", "ort-cuda-graph", "ort-trt", "torch", "tax")
BUDGET_S = {"ort-cpu": 45.0, "ort-cuda": 60.0, "ort-cuda-fp16": 60.0, "ort-cuda-graph": 90.0, "ort-trt": 180.0,
            "torch": 120.0, "tax": 30.0}
FLOOR = 0.25  # the service's default score threshold (DETECTFLOW_SCORE_THRESHOLD)
MAX_CANDIDATES = 1000  # the service's default max_candidates
# onnx2torch modules whose constant inputs are shapes, axes or scales: read on the host every call.
_SHAPE_OPS = ("OnnxReshape", "OnnxSlice", "OnnxSplit", "OnnxResize")


@dataclass
class Report:
    """Results as they come; written to ``out`` after every section so a killed run keeps what it had."""

    out: Path
    env: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)  # builds, loads, skips, errors
    accuracy: list[dict[str, Any]] = field(default_factory=list)
    tax: list[dict[str, Any]] = field(default_factory=list)

    def event(self, section: str, what: str, **detail: Any) -> None:
        self.events.append({"section": section, "what": what, **detail})
        print(f"[{section}] {what} {json.dumps(detail, default=str)}", flush=True)

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        body = {"env": self.env, "rows": self.rows, "events": self.events, "accuracy": self.accuracy,
                "tax": self.tax}
        (self.out / "bench_gpu.json").write_text(json.dumps(body, indent=1, default=str))
        (self.out / "bench_gpu.txt").write_text(render(self))


@dataclass
class Inputs:
    """The batches every engine gets: letterboxed uint8 [3, H, W] tensors cycled to each batch size."""

    config: ModelConfig
    tensors: list[np.ndarray]
    source: str
    reference: dict[str, np.ndarray] | None = None  # CPU EP FP32 outputs, one row per tensor

    def uint8(self, n: int) -> np.ndarray:
        return np.stack([self.tensors[i % len(self.tensors)] for i in range(n)])

    def float32(self, n: int) -> np.ndarray:
        return to_model_input([self.tensors[i % len(self.tensors)] for i in range(n)], self.config.input.scale)

    def reference_outputs(self, n: int) -> dict[str, np.ndarray] | None:
        if self.reference is None:
            return None
        rows = np.arange(n) % len(self.tensors)
        return {name: out[rows] for name, out in self.reference.items()}


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def spent(self) -> bool:
        return time.monotonic() >= self.end


def parse_batches(text: str) -> list[int]:
    batches = sorted({int(part) for part in text.split(",") if part.strip()})
    if not batches or batches[0] < 1:
        raise ValueError(f"batch sizes must be positive integers, got {text!r}")
    return batches


def timed(step: Callable[[], object], images: int, *, warmup: int, iters: int, seconds: float) -> dict[str, Any]:
    """Median wall ms per call over at least 2 and at most ``iters`` calls (fewer once ``seconds`` pass)."""
    for _ in range(warmup):
        step()
    laps: list[float] = []
    cpu0, end = time.process_time(), time.perf_counter() + seconds
    while len(laps) < max(2, iters):
        t0 = time.perf_counter()
        step()
        laps.append(time.perf_counter() - t0)
        if len(laps) >= 2 and time.perf_counter() > end:
            break
    cpu = time.process_time() - cpu0
    p50 = statistics.median(laps) * 1000
    return {"iters": len(laps), "ms_per_batch": round(p50, 3), "ms_per_img": round(p50 / images, 4),
            "img_per_s": round(images * 1000 / p50, 1), "cpu_ms_per_img": round(cpu * 1000 / (len(laps) * images), 3)}


def measure(report: Report, section: str, budget: Budget, label: dict[str, Any], batch: int,
            step: Callable[[], object], *, warmup: int, iters: int, seconds: float) -> None:
    if budget.spent():
        skip(report, section, label, batch)
        return
    row = {"section": section, **label, "batch": batch}
    try:
        row.update(timed(step, batch, warmup=warmup, iters=iters, seconds=seconds))
    except Exception as exc:  # a benchmark row, not the service: record whatever broke and go on
        row["error"] = f"{type(exc).__name__}: {exc}"[:800]
    report.rows.append(row)
    print(f"[{section}] {json.dumps(row)}", flush=True)


def skip(report: Report, section: str, label: dict[str, Any], batch: int) -> None:
    report.rows.append({"section": section, **label, "batch": batch, "skipped": "section time budget spent"})


def compare(report: Report, inputs: Inputs, engine: str, batch: int, outputs: dict[str, np.ndarray]) -> None:
    """How far an engine's outputs are from the CPU provider's FP32 ones, and whether decoding agrees."""
    ref = inputs.reference_outputs(batch)
    if ref is None:
        return
    name = inputs.config.outputs[0].name
    got, want = outputs[name].astype(np.float32), ref[name]
    entry: dict[str, Any] = {"engine": engine, "batch": batch, "max_abs_diff": float(np.abs(got - want).max())}
    if inputs.config.decoder == "darknet_yolo":  # columns: cx, cy, w, h (pixels), objectness, classes
        live = want[..., 4] >= FLOOR
        entry["max_box_px_diff_live"] = float(np.abs(got[..., :4] - want[..., :4])[live].max(initial=0.0))
        entry["max_prob_diff"] = float(np.abs(got[..., 4:] - want[..., 4:]).max())
    entry["candidates"] = sum(len(c) for c in decode_outputs({name: got}, inputs.config, FLOOR, MAX_CANDIDATES))
    entry["candidates_reference"] = sum(len(c) for c in decode_outputs(ref, inputs.config, FLOOR, MAX_CANDIDATES))
    report.accuracy.append(entry)
    print(f"[accuracy] {json.dumps(entry)}", flush=True)


# --------------------------------------------------------------------------- environment and inputs


def _run_text(cmd: Sequence[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        return (done.stdout + done.stderr).strip()[:2000]
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"


def environment() -> dict[str, Any]:
    """What the host has: GPU, ONNX Runtime build and providers, PyTorch, TensorRT libraries."""
    env: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": sys.version.split()[0],
                           "platform": platform.platform(), "cpus": os.cpu_count(),
                           "nvidia_smi": _run_text(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                                    "--format=csv,noheader"]),
                           "onnxruntime": ort.__version__, "onnxruntime_file": ort.__file__,
                           "ld_library_path": os.environ.get("LD_LIBRARY_PATH"),
                           "onnxruntime_distributions": importlib.metadata.packages_distributions().get("onnxruntime"),
                           "ort_available_providers": ort.get_available_providers(),
                           "ort_device": ort.get_device(), "service_usable_providers": list(usable_providers())}
    # Where ORT's GPU providers and TensorRT would come from: wheels (onnxruntime/capi, tensorrt_libs,
    # nvidia/*/lib), the system and CUDA library folders. Fixed depths: a recursive walk of a large
    # site-packages takes long.
    site = [p for p in sys.path if p.endswith("-packages")]
    roots = [f"{r}{'/*' * depth}" for r in site for depth in range(4)]
    roots += ["/usr/lib/x86_64-linux-gnu", "/usr/local/cuda*/lib64", "/usr/local/cuda*/targets/*/lib", "/usr/local/lib"]
    patterns = ["libnvinfer.so*", "libonnxruntime_providers_cuda.so", "libonnxruntime_providers_tensorrt.so"]
    env["libraries"] = {p: sorted({f for r in roots for f in glob.glob(f"{r}/{p}")})[:5] for p in patterns}
    env["find_library"] = {n: ctypes.util.find_library(n) for n in ("nvinfer", "cudart", "cudnn")}
    for dist in ("onnxruntime", "onnxruntime-gpu", "tensorrt", "torch", "torch-tensorrt", "onnx", "onnx2torch"):
        try:
            env.setdefault("packages", {})[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            env.setdefault("packages", {})[dist] = None
    try:
        # PyTorch is optional (GPU hosts only, not a dependency): imported where a section needs it.
        import torch

        env["torch_cuda"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            env["torch_device"] = torch.cuda.get_device_name(0)
            env["torch_cuda_version"] = torch.version.cuda
            env["cudnn"] = torch.backends.cudnn.version()
    except ImportError as exc:
        env["torch_cuda"] = f"{type(exc).__name__}: {exc}"
    return env


def load_inputs(model_dir: Path, images: Path | None) -> Inputs:
    config = ModelConfig.load(model_dir / CONFIG_FILE)
    spec = config.input
    tensors = []
    for path in sorted(images.iterdir()) if images else []:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is not None:
            tensors.append(letterbox(image, (spec.width, spec.height), spec.pad_value)[0])
    if tensors:
        return Inputs(config, tensors, f"{len(tensors)} images from {images}")
    rng = np.random.default_rng(0)  # no images: decode cost is then not that of real photos
    noise = [rng.integers(0, 256, (3, spec.height, spec.width), dtype=np.uint8) for _ in range(8)]
    return Inputs(config, noise, "8 random tensors (synthetic)")


# --------------------------------------------------------------------------- ONNX Runtime


def reference(inputs: Inputs, model_dir: Path) -> None:
    """The CPU provider's FP32 outputs for every input tensor: what the other engines are compared with,
    and the real outputs that the decode figures decode."""
    session, _ = create_session(model_dir / MODEL_FILE, SessionSettings(providers=(CPU,)))
    names = [o.name for o in session.get_outputs()]
    batch = to_model_input(inputs.tensors, inputs.config.input.scale)
    inputs.reference = dict(zip(names, session.run(names, {inputs.config.input.name: batch}), strict=True))


def _ort_rows(report: Report, section: str, budget: Budget, session: Any, inputs: Inputs, batches: Sequence[int],
              label: dict[str, Any], args: SimpleNamespace, *, iobinding: bool) -> None:
    name = inputs.config.input.name
    outputs = [o.name for o in session.get_outputs()]
    for batch in batches:
        x = inputs.float32(batch)
        if budget.spent():
            skip(report, section, {**label, "variant": "numpy in/out"}, batch)
            continue
        try:
            got = dict(zip(outputs, session.run(outputs, {name: x}), strict=True))
            if section != "ort-cpu":
                compare(report, inputs, f"{label['provider']} {label['precision']}", batch, got)
        except Exception as exc:  # record it; the next batch size may still run
            report.event(section, "run failed", batch=batch, error=f"{type(exc).__name__}: {exc}"[:800])
            continue
        iters, seconds = (args.cpu_iters, float("inf")) if section == "ort-cpu" else (args.iters, args.seconds)
        measure(report, section, budget, {**label, "variant": "numpy in/out"}, batch,
                lambda x=x: session.run(outputs, {name: x}), warmup=1, iters=iters, seconds=seconds)
        if not iobinding:
            continue
        try:
            binding = session.io_binding()
            x_dev = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
            binding.bind_ortvalue_input(name, x_dev)
            for out_name in outputs:
                shape = got[out_name].shape
                binding.bind_ortvalue_output(out_name, ort.OrtValue.ortvalue_from_shape_and_type(
                    shape, got[out_name].dtype.type, "cuda", 0))
        except Exception as exc:  # the binding API failed: no IO-binding rows for this batch
            report.event(section, "io binding failed", batch=batch, error=f"{type(exc).__name__}: {exc}"[:800])
            continue

        def on_device(binding: Any = binding) -> None:
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()

        def with_copies(binding: Any = binding, x_dev: Any = x_dev, x: np.ndarray = x) -> None:
            x_dev.update_inplace(x)
            session.run_with_iobinding(binding)
            binding.copy_outputs_to_cpu()

        measure(report, section, budget, {**label, "variant": "io binding, on device"}, batch, on_device,
                warmup=2, iters=args.iters, seconds=args.seconds)
        measure(report, section, budget, {**label, "variant": "io binding + H2D/D2H copies"}, batch, with_copies,
                warmup=2, iters=args.iters, seconds=args.seconds)


def _available(report: Report, section: str, provider: str) -> bool:
    if provider in usable_providers():
        return True

    report.event(section, "skipped: provider not usable on this host", provider=provider,
                 built_with=ort.get_available_providers(), usable=list(usable_providers()))
    return False


def ort_section(report: Report, section: str, inputs: Inputs, args: SimpleNamespace) -> None:
    budget = Budget(args.budget[section])
    model = args.model_dir / MODEL_FILE
    spec = inputs.config.input
    shape = (spec.name, 3, spec.height, spec.width)
    if section == "ort-cpu":
        session, got = create_session(model, SessionSettings(providers=(CPU,)))
        report.event(section, "session", providers=got)
        _ort_rows(report, section, budget, session, inputs, args.batches,
                  {"engine": "onnxruntime", "provider": got[0], "precision": "fp32"}, args, iobinding=False)
        return
    if section in ("ort-cuda", "ort-cuda-fp16"):
        if not _available(report, section, CUDA):
            return
        precision = "fp32"
        if section == "ort-cuda-fp16":
            model, precision = fp16_model(report, section, args), "fp16"
        t0 = time.perf_counter()
        session, got = create_session(model, SessionSettings(providers=(CUDA, CPU)))
        report.event(section, "session", precision=precision, providers=got, seconds=round(time.perf_counter() - t0, 2))
        _ort_rows(report, section, budget, session, inputs, args.batches,
                  {"engine": "onnxruntime", "provider": got[0], "precision": precision}, args, iobinding=True)
        return
    if section == "ort-cuda-graph":
        if _available(report, section, CUDA):
            cuda_graph_rows(report, budget, inputs, args)
        return
    if not _available(report, section, TENSORRT):
        return
    cache = args.trt_cache
    shutil.rmtree(cache, ignore_errors=True)  # the first build is what is measured
    settings = SessionSettings(providers=(TENSORRT, CUDA, CPU), trt_cache_dir=cache, trt_fp16=True)
    x = inputs.float32(max(args.batches))
    for what in ("first build (empty engine cache)", "load from engine cache"):
        t0 = time.perf_counter()
        session, got = create_session(model, settings, max_batch=max(args.batches), input_shape=shape)
        t1 = time.perf_counter()
        session.run(None, {spec.name: x})
        t2 = time.perf_counter()
        report.event(section, what, providers=got, session_s=round(t1 - t0, 2), first_run_s=round(t2 - t1, 2),
                     cache_files=sorted(p.name for p in cache.iterdir()) if cache.exists() else [])
    _ort_rows(report, section, budget, session, inputs, args.batches,
              {"engine": "onnxruntime", "provider": got[0], "precision": "fp16"}, args, iobinding=True)


def fp16_model(report: Report, section: str, args: SimpleNamespace) -> Path:
    """An FP16 copy of the model by ONNX Runtime's own converter, input and output kept float32; made once
    per run, in a temporary folder."""
    if getattr(args, "fp16_model", None) is not None:
        return Path(args.fp16_model)
    # The FP16 converter loads onnxruntime.transformers (slow, only this section needs it).
    from onnxruntime.transformers.float16 import convert_float_to_float16

    t0 = time.perf_counter()
    converted = convert_float_to_float16(onnx.load(str(args.model_dir / MODEL_FILE)), keep_io_types=True)
    target = Path(tempfile.mkdtemp(prefix="detectflow-bench-gpu-")) / "model-fp16.onnx"
    onnx.save(converted, str(target))
    args.fp16_model = target
    report.event(section, "fp16 model converted", converter="onnxruntime.transformers.float16, keep_io_types",
                 bytes=target.stat().st_size, seconds=round(time.perf_counter() - t0, 2))
    return target


def cuda_graph_rows(report: Report, budget: Budget, inputs: Inputs, args: SimpleNamespace) -> None:
    """ORT's CUDA provider with ``enable_cuda_graph``: a graph is captured per session, for fixed input and
    output addresses, so one session per precision and batch size, fed through IO binding and replayed."""
    section = "ort-cuda-graph"
    name = inputs.config.input.name
    for precision in ("fp32", "fp16"):
        try:
            model = args.model_dir / MODEL_FILE if precision == "fp32" else fp16_model(report, section, args)
        except Exception as exc:  # no converter: the FP32 rows stand
            report.event(section, "fp16 conversion failed", error=f"{type(exc).__name__}: {exc}"[:800])
            continue
        label = {"engine": "onnxruntime", "provider": CUDA, "precision": precision}
        for batch in args.batches:
            if budget.spent():
                skip(report, section, {**label, "variant": "cuda graph, io binding, on device"}, batch)
                continue
            x = inputs.float32(batch)
            try:
                options = ort.SessionOptions()
                options.log_severity_level = 3
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                t0 = time.perf_counter()
                session = ort.InferenceSession(str(model), sess_options=options,
                                               providers=[(CUDA, {"enable_cuda_graph": "1"}), CPU])
                binding = session.io_binding()
                x_dev = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
                binding.bind_ortvalue_input(name, x_dev)
                outs = {}
                for out in session.get_outputs():  # the shapes from the CPU reference (no reference: no rows)
                    shape = (batch, *inputs.reference[out.name].shape[1:])  # type: ignore[index]
                    outs[out.name] = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cuda", 0)
                    binding.bind_ortvalue_output(out.name, outs[out.name])
                for _ in range(3):  # ORT runs a few times before it captures, then replays
                    session.run_with_iobinding(binding)
                binding.synchronize_outputs()
                report.event(section, "session", precision=precision, batch=batch, providers=session.get_providers(),
                             seconds=round(time.perf_counter() - t0, 2))
                compare(report, inputs, f"{CUDA} cuda graph {precision}", batch,
                        {k: v.numpy() for k, v in outs.items()})
            except Exception as exc:  # capture refused (a node on the CPU, say): no rows for this batch
                report.event(section, "cuda graph failed", precision=precision, batch=batch,
                             error=f"{type(exc).__name__}: {exc}"[:800])
                continue

            def replay(session: Any = session, binding: Any = binding) -> None:
                session.run_with_iobinding(binding)
                binding.synchronize_outputs()

            def replay_with_copies(session: Any = session, binding: Any = binding, x_dev: Any = x_dev,
                                   x: np.ndarray = x, outs: dict[str, Any] = outs) -> None:
                x_dev.update_inplace(x)
                session.run_with_iobinding(binding)
                for value in outs.values():
                    value.numpy()

            measure(report, section, budget, {**label, "variant": "cuda graph, io binding, on device"}, batch,
                    replay, warmup=2, iters=args.iters, seconds=args.seconds)
            measure(report, section, budget, {**label, "variant": "cuda graph, io binding + copies"}, batch,
                    replay_with_copies, warmup=2, iters=args.iters, seconds=args.seconds)
            del session, binding, x_dev, outs


# --------------------------------------------------------------------------- PyTorch (onnx2torch)


def keep_shape_constants_on_host(net: Any) -> int:
    """Move the constants that onnx2torch's Reshape/Slice/Split/Resize read as Python numbers to the CPU.

    On the GPU each such read (``.tolist()``, ``torch.any(shape == 0)``) waits for the device and
    cannot be captured in a CUDA graph; on the host it is a plain read. Returns how many moved.
    """
    modules = dict(net.named_modules())
    moved = 0
    for node in net.graph.nodes:
        if node.op != "get_attr" or not node.users:
            continue
        if all(user.op == "call_module" and type(modules[user.target]).__name__.startswith(_SHAPE_OPS)
               and (not user.args or user.args[0] is not node) for user in node.users):
            owner_name, _, attr = node.target.rpartition(".")
            owner = net.get_submodule(owner_name) if owner_name else net
            setattr(owner, attr, getattr(owner, attr).cpu())
            moved += 1
    return moved


def torch_section(report: Report, inputs: Inputs, args: SimpleNamespace) -> None:
    # PyTorch is optional (GPU hosts only, not a dependency): imported where a section needs it.
    import onnx
    import torch
    from onnx2torch import convert  # optional, like torch

    budget = Budget(args.budget["torch"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.torch_on_cpu:
        report.event("torch", "skipped: no CUDA device for PyTorch")
        return
    torch.backends.cudnn.benchmark = True  # one algorithm search per input shape, then the fastest
    graph = onnx.load(str(args.model_dir / MODEL_FILE))
    for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        t0 = time.perf_counter()
        net = convert(graph).eval().to(device=device, dtype=dtype)
        moved = keep_shape_constants_on_host(net)
        report.event("torch", "converted", precision=precision, device=device, shape_constants_on_host=moved,
                     seconds=round(time.perf_counter() - t0, 2))
        label = {"engine": f"pytorch {torch.__version__} via onnx2torch", "provider": device, "precision": precision}
        for batch in args.batches:
            _torch_rows(report, budget, net, inputs, batch, label, dtype, args)
        del net
        if device == "cuda":
            torch.cuda.empty_cache()


def _torch_rows(report: Report, budget: Budget, net: Any, inputs: Inputs, batch: int, label: dict[str, Any],
                dtype: Any, args: SimpleNamespace) -> None:
    # PyTorch is optional (GPU hosts only, not a dependency): imported where a section needs it.
    import torch

    device, scale = label["provider"], inputs.config.input.scale
    x_host, u8_host = torch.from_numpy(inputs.float32(batch)), torch.from_numpy(inputs.uint8(batch))
    x_dev = x_host.to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    @torch.inference_mode()
    def numpy_in_out() -> np.ndarray:
        return net(x_host.to(device=device, dtype=dtype)).float().cpu().numpy()

    @torch.inference_mode()
    def uint8_in() -> np.ndarray:
        x = u8_host.to(device=device).to(dtype).mul_(scale)  # to_model_input's work, on the GPU
        return net(x).float().cpu().numpy()

    @torch.inference_mode()
    def on_device() -> None:
        net(x_dev)
        sync()

    try:
        compare(report, inputs, f"torch {label['precision']}", batch, {inputs.config.outputs[0].name: numpy_in_out()})
    except Exception as exc:  # the conversion or the device failed: say so, try the next batch
        report.event("torch", "run failed", precision=label["precision"], batch=batch,
                     error=f"{type(exc).__name__}: {exc}"[:800])
        return
    variants: list[tuple[str, Callable[[], object]]] = [("numpy in/out", numpy_in_out), ("on device", on_device)]
    if label["precision"] == "fp16":
        variants.insert(1, ("uint8 in, /255 on GPU, numpy out", uint8_in))
        if device == "cuda":
            variants += _graph_variants(report, net, u8_host, dtype, scale)
    for variant, step in variants:
        measure(report, "torch", budget, {**label, "variant": variant}, batch, step,
                warmup=3, iters=args.iters, seconds=args.seconds)


def _graph_variants(report: Report, net: Any, u8_host: Any, dtype: Any, scale: float) -> list[tuple[str, Any]]:
    """One CUDA graph per batch: uint8 in (pinned host -> device), /255, the model; replayed as one launch."""
    # PyTorch is optional (GPU hosts only, not a dependency): imported where a section needs it.
    import torch

    try:
        pinned = u8_host.pin_memory()
        static_u8 = pinned.to("cuda")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(3):  # warm up outside capture (cuDNN picks its algorithms here)
                net(static_u8.to(dtype).mul_(scale))
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            static_out = net(static_u8.to(dtype).mul_(scale))
        out_host = torch.empty(static_out.shape, dtype=static_out.dtype, pin_memory=True)
    except Exception as exc:  # capture refused (a host read inside the graph, say): no graph rows
        report.event("torch", "cuda graph capture failed", error=f"{type(exc).__name__}: {exc}"[:800])
        return []

    def replay() -> None:
        graph.replay()
        torch.cuda.synchronize()

    def replay_with_copies() -> None:
        static_u8.copy_(pinned, non_blocking=True)
        graph.replay()
        out_host.copy_(static_out, non_blocking=True)
        torch.cuda.synchronize()

    return [("cuda graph, on device", replay), ("cuda graph, uint8 H2D + fp16 D2H", replay_with_copies)]


# --------------------------------------------------------------------------- the stage's CPU work


def tax_section(report: Report, inputs: Inputs, args: SimpleNamespace) -> None:
    """CPU time per image of the inference stage's work around the model, at each batch size."""
    budget = Budget(args.budget["tax"])
    scale = inputs.config.input.scale
    for batch in args.batches:
        if budget.spent():
            report.event("tax", "skipped: section time budget spent", batch=batch)
            continue
        tensors = [inputs.tensors[i % len(inputs.tensors)] for i in range(batch)]
        outputs = inputs.reference_outputs(batch)
        row: dict[str, Any] = {"batch": batch}
        steps: list[tuple[str, Callable[[], object]]] = [("to_model_input", lambda t=tensors: to_model_input(t, scale))]
        if outputs is not None:
            steps.append(("decode_outputs", lambda o=outputs: decode_outputs(o, inputs.config, FLOOR, MAX_CANDIDATES)))
        for name, step in steps:
            step()
            calls, cpu0, wall0 = 0, time.process_time(), time.perf_counter()
            while calls < 3 or time.perf_counter() - wall0 < args.tax_seconds:
                step()
                calls += 1
            row[f"{name}_cpu_ms_per_img"] = round((time.process_time() - cpu0) * 1000 / (calls * batch), 4)
            row[f"{name}_wall_ms_per_img"] = round((time.perf_counter() - wall0) * 1000 / (calls * batch), 4)
        report.tax.append(row)
        print(f"[tax] {json.dumps(row)}", flush=True)


# --------------------------------------------------------------------------- output


def render(report: Report) -> str:
    env = report.env
    lines = [f"detectflow bench gpu, {env.get('date', '?')}: {env.get('nvidia_smi') or 'no GPU'}; "
             f"{env.get('cpus')} CPUs; onnxruntime {env.get('onnxruntime')} {env.get('onnxruntime_distributions')}, "
             f"providers built {env.get('ort_available_providers')}, usable {env.get('service_usable_providers')}",
             f"inputs: {env.get('inputs')}", "",
             f"{'engine':<30} {'provider':<26} {'prec':<5} {'variant':<34} {'batch':>5} {'ms/batch':>9} "
             f"{'ms/img':>8} {'img/s':>8} {'cpu ms/img':>10}"]
    for row in report.rows:
        head = (f"{row.get('engine', '')[:30]:<30} {row.get('provider', '')[:26]:<26} {row.get('precision', ''):<5} "
                f"{row.get('variant', '')[:34]:<34} {row['batch']:>5} ")
        if "ms_per_batch" in row:
            lines.append(head + f"{row['ms_per_batch']:>9.3f} {row['ms_per_img']:>8.4f} {row['img_per_s']:>8.1f} "
                                f"{row['cpu_ms_per_img']:>10.3f}")
        else:
            lines.append(head + str(row.get("error") or row.get("skipped"))[:200])
    if report.accuracy:
        lines += ["", "accuracy against the CPU provider (FP32), same batch:"]
        lines += [json.dumps(a) for a in report.accuracy]
    if report.tax:
        lines += ["", f"{'batch':>5} {'to_model_input cpu ms/img':>26} {'decode_outputs cpu ms/img':>26}"]
        lines += [f"{t['batch']:>5} {t.get('to_model_input_cpu_ms_per_img', float('nan')):>26.4f} "
                  f"{t.get('decode_outputs_cpu_ms_per_img', float('nan')):>26.4f}" for t in report.tax]
    lines += ["", "events:"] + [json.dumps(e, default=str) for e in report.events]
    return "\n".join(lines) + "\n"


@click.command(help=(__doc__ or "").split("\n\n")[0], context_settings=CONTEXT_SETTINGS)
@click.option("--model-dir", type=click.Path(path_type=Path), required=True,
              help="a version folder: model.onnx, config.json")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="folder of images to letterbox (default: random tensors)")
@click.option("--batches", type=ParsedBy("batches", parse_batches), default="1,8,32,64")
@click.option("--iters", type=int, default=200, help="most timed calls per GPU row")
@click.option("--seconds", type=float, default=1.5, help="time per GPU row, after at least 2 calls")
@click.option("--cpu-iters", type=int, default=3, help="timed calls per CPU-provider row")
@click.option("--tax-seconds", type=float, default=0.5, help="time per stage-CPU-work figure")
@click.option("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {SECTIONS}")
@click.option("--budget", default="", help="per-section seconds, e.g. ort-trt=120,torch=60")
@click.option("--trt-cache", type=click.Path(path_type=Path),
              default=lambda: Path(tempfile.gettempdir()) / "detectflow-trt-cache")
@click.option("--torch-on-cpu", is_flag=True, help="run the torch section without a GPU")
@click.option("--nvidia-libs", is_flag=True,
              help="restart with NVIDIA's pip CUDA/cuDNN library folders (nvidia/*/lib) on LD_LIBRARY_PATH")
@click.option("--out", type=click.Path(path_type=Path), default=lambda: Path(os.environ.get("OUT", "out/bench-gpu")))
@click.pass_obj
def bench_gpu(obj: dict[str, Any] | None, **params: Any) -> int:
    args = SimpleNamespace(**params)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        raise click.BadParameter(f"unknown sections {sorted(unknown)}; known: {SECTIONS}", param_hint="'--sections'")
    budget = dict(BUDGET_S)
    for part in filter(None, args.budget.split(",")):
        key, _, value = part.partition("=")
        if key not in budget:
            raise click.BadParameter(f"--budget names unknown section {key!r}", param_hint="'--budget'")
        budget[key] = float(value)
    args.budget = budget
    args.cpu_iters = min(args.cpu_iters, args.iters)
    return run(args, restart=bool(obj and obj.get("restart")))


def nvidia_library_dirs() -> list[str]:
    """The ``lib`` folders of NVIDIA's pip wheels (``nvidia/cu13/lib``, ``nvidia/cudnn/lib``, ...), if any."""
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    return sorted({d for r in roots for d in glob.glob(f"{r}/*/lib") if os.path.isdir(d)})


def _restart_with_nvidia_libs() -> None:
    """The loader reads LD_LIBRARY_PATH once, at start: put the pip CUDA libraries on it and exec again."""
    current = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    missing = [d for d in nvidia_library_dirs() if d not in current]
    if not missing or os.environ.get("DETECTFLOW_BENCH_GPU_RESTARTED"):
        return
    os.environ["LD_LIBRARY_PATH"] = ":".join(current + missing)
    os.environ["DETECTFLOW_BENCH_GPU_RESTARTED"] = "1"
    print(f"restarting with LD_LIBRARY_PATH += {missing}", flush=True)
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])  # noqa: S606 - this same command, again


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m infra.bench_gpu [OPTIONS]``; with ``argv`` given (a test), --nvidia-libs never restarts."""
    return invoke(bench_gpu, argv, prog_name="python -m infra.bench_gpu", obj={"restart": argv is None})


def run(args: SimpleNamespace, *, restart: bool) -> int:
    if args.nvidia_libs and restart:
        _restart_with_nvidia_libs()
    report = Report(args.out)
    try:
        report.env = environment()
    except Exception as exc:  # the figures still matter without the description of the host
        report.env = {"error": f"{type(exc).__name__}: {exc}"}
    inputs = load_inputs(args.model_dir, args.images)
    report.env["inputs"] = inputs.source
    print(json.dumps(report.env, indent=1, default=str), flush=True)
    try:
        reference(inputs, args.model_dir)
    except Exception as exc:  # no accuracy columns and no decode figures, the speed rows still run
        report.event("reference", "CPU provider reference failed", error=f"{type(exc).__name__}: {exc}"[:800])
    for section in [s for s in SECTIONS if s in args.sections]:
        t0 = time.perf_counter()
        try:
            if section.startswith("ort-"):
                ort_section(report, section, inputs, args)
            elif section == "torch":
                torch_section(report, inputs, args)
            else:
                tax_section(report, inputs, args)
        except Exception as exc:  # one section's failure (an import, a provider) must not lose the others
            report.event(section, "section failed", error=f"{type(exc).__name__}: {exc}"[:800])
        report.event(section, "done", seconds=round(time.perf_counter() - t0, 1))
        report.save()
    print(render(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""ONNX Runtime sessions on the execution providers this host can actually run.

``onnxruntime-gpu`` lists TensorRT and CUDA in ``get_available_providers()`` whether or not a GPU,
the driver or the CUDA/TensorRT libraries exist (that list is what the wheel was built with), and
asking for a provider that cannot load logs errors and falls back.  So each provider is probed
quietly first, with ``ctypes`` only (a failed ``dlopen`` raises ``OSError`` and prints nothing):

- a GPU: ``libcuda.so.1`` (the driver) loads, ``cuInit(0)`` succeeds and ``cuDeviceGetCount`` > 0;
- the provider library ``libonnxruntime_providers_<ep>.so`` loads with all its dependencies
  (cudart/cublas/cudnn for CUDA, libnvinfer for TensorRT), exactly what ORT itself will ``dlopen``.

Order of preference: TensorRT, CUDA, CPU.  CPU is always last, so a provider that fails anyway
still leaves a working session; the providers the session really got are returned.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

log = logging.getLogger(__name__)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PREFERENCE = (TENSORRT, CUDA, CPU)
_PROVIDER_LIBS = {TENSORRT: "libonnxruntime_providers_tensorrt.so", CUDA: "libonnxruntime_providers_cuda.so"}
# ORT log levels: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
LOG_ERROR = 3


class SessionError(RuntimeError):
    """An inference session could not be created."""


@dataclass(frozen=True)
class SessionSettings:
    """How to run a model.  ``providers=None`` means: the best usable ones, in PREFERENCE order."""

    intra_op_threads: int = 0  # 0: ORT's default (one per physical core)
    inter_op_threads: int = 1  # the graph is a chain; parallel branches buy nothing
    providers: tuple[str, ...] | None = None
    log_severity: int = LOG_ERROR
    # ORT's idle intra-op threads busy-wait for the next task by default.  On this 2-core host,
    # shared with Kafka and Cassandra, that burns cores they need and measured no faster
    # (yolov4-tiny batch 1: 44.7 vs 43.2 ms/img median), so spinning is off unless asked for.
    allow_spinning: bool = False
    trt_cache_dir: Path | None = None  # TensorRT engine cache; building an engine takes minutes
    trt_fp16: bool = False


def _cuda_device_count() -> int:
    """GPUs the driver reports, or 0 when there is no driver or no device (never raises, never prints)."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        if libcuda.cuInit(0) != 0:
            return 0
        count = ctypes.c_int(0)
        if libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    except (OSError, AttributeError):
        return 0


def _preload_pip_cuda_libraries() -> None:
    """Make CUDA libraries from NVIDIA's pip wheels findable, as ORT's own preload does; quiet."""
    if importlib.util.find_spec("nvidia") is None:
        return
    # preload_dlls() reports missing libraries with print(); the probe must stay silent.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
        ort.preload_dlls()


def _provider_library_loads(provider: str) -> bool:
    capi = Path(ort.__file__).parent / "capi"
    try:
        # Provider libraries resolve symbols from the shared bridge, which ORT loads RTLD_GLOBAL too.
        ctypes.CDLL(str(capi / "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(capi / _PROVIDER_LIBS[provider]))
    except OSError as exc:
        log.debug("%s unusable: %s", provider, exc)
        return False
    return True


@functools.lru_cache(maxsize=1)
def usable_providers() -> tuple[str, ...]:
    """Providers that can run on this host, best first; always ends with CPU."""
    built = set(ort.get_available_providers())
    gpu_candidates = [p for p in (TENSORRT, CUDA) if p in built]
    usable: list[str] = []
    if gpu_candidates and _cuda_device_count() > 0:
        _preload_pip_cuda_libraries()
        usable = [p for p in gpu_candidates if _provider_library_loads(p)]
    return (*usable, CPU)


def _provider_options(provider: str, settings: SessionSettings, max_batch: int | None,
                      input_shape: tuple[str, int, int, int] | None) -> dict[str, Any]:
    if provider != TENSORRT:
        return {}
    options: dict[str, Any] = {"trt_fp16_enable": settings.trt_fp16}
    if settings.trt_cache_dir is not None:
        settings.trt_cache_dir.mkdir(parents=True, exist_ok=True)
        options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(settings.trt_cache_dir))
    if max_batch is not None and input_shape is not None:
        # One optimisation profile over the whole dynamic batch range, else TRT rebuilds per batch size.
        name, c, h, w = input_shape
        options.update(trt_profile_min_shapes=f"{name}:1x{c}x{h}x{w}",
                       trt_profile_opt_shapes=f"{name}:{max_batch}x{c}x{h}x{w}",
                       trt_profile_max_shapes=f"{name}:{max_batch}x{c}x{h}x{w}")
    return options


def create_session(
    model_path: Path,
    settings: SessionSettings | None = None,
    *,
    max_batch: int | None = None,
    input_shape: tuple[str, int, int, int] | None = None,
) -> tuple[ort.InferenceSession, list[str]]:
    """Open ``model_path`` on the best usable providers; return the session and the providers it got.

    ``max_batch``/``input_shape`` (name, C, H, W) size TensorRT's optimisation profile.
    """
    settings = settings or SessionSettings()
    wanted = settings.providers or usable_providers()
    options = ort.SessionOptions()
    options.log_severity_level = settings.log_severity
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = settings.inter_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.allow_spinning else "0")
    providers = [(p, _provider_options(p, settings, max_batch, input_shape)) for p in wanted]
    try:
        session = ort.InferenceSession(os.fspath(model_path), sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own pybind exception types, not a common base
        raise SessionError(f"cannot open {model_path} on {list(wanted)}: {exc}") from exc
    chosen = session.get_providers()
    log.info("session for %s on %s", model_path, chosen)
    return session, chosen

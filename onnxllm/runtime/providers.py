"""Choose ONNX Runtime execution providers and build session options.

`select_providers("auto")` prefers CUDA, then DirectML, then CPU, but only among
providers that the installed onnxruntime offers *and* that actually start: an
onnxruntime-gpu install without cuDNN still lists CUDAExecutionProvider, then
silently runs everything on the CPU. Each candidate is therefore started on a
tiny in-memory graph before it is chosen.
"""

from __future__ import annotations

import os

import ctypes
import functools
import importlib.metadata
import platform
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

from onnxllm.errors import DeviceError

if TYPE_CHECKING:
    import onnxruntime

DEVICES = ("auto", "cpu", "cuda", "dml")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DML = "DmlExecutionProvider"

#: Device name -> ONNX Runtime execution provider name.
DEVICE_PROVIDERS = MappingProxyType({"cpu": CPU, "cuda": CUDA, "dml": DML})

#: Order in which `auto` tries the accelerators; CPU is always the last resort.
AUTO_ORDER = ("cuda", "dml")

#: What to install to get each accelerator. The CPU, GPU and DirectML wheels ship the
#: same `onnxruntime` module and overwrite each other, so the CPU one must go first
#: (`pip install onnxllm[gpu]` alone would leave both installed).
_PACKAGE_FOR_DEVICE = MappingProxyType({"cuda": "onnxruntime-gpu", "dml": "onnxruntime-directml"})
INSTALL_HINTS = MappingProxyType(
    {d: f"pip uninstall -y onnxruntime && pip install {p}" for d, p in _PACKAGE_FOR_DEVICE.items()}
)

#: Distributions that all provide the `onnxruntime` module.
ORT_PACKAGES = (
    "onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-qnn"
)

#: Graph optimization level names -> onnxruntime.GraphOptimizationLevel member names.
_OPTIMIZATION_LEVELS = MappingProxyType(
    {
        "disable": "ORT_DISABLE_ALL",
        "basic": "ORT_ENABLE_BASIC",
        "extended": "ORT_ENABLE_EXTENDED",
        "all": "ORT_ENABLE_ALL",
    }
)

# c = a + b on float[1], IR 7 / opset 13, so that any onnxruntime >= 1.20 loads it.
# Serialized by onnx.helper; kept as bytes because the runtime install has no `onnx`.
TINY_MODEL_BYTES = (
    b"\x08\x07:F\n\x0e\n\x01a\n\x01b\x12\x01c\"\x03Add\x12\x01tZ\x0f\n\x01a\x12\n\n"
    b"\x08\x08\x01\x12\x04\n\x02\x08\x01Z\x0f\n\x01b\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08"
    b"\x01b\x0f\n\x01c\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\r"
)


@dataclass(frozen=True)
class ProviderChoice:
    """The device picked, the ORT `providers=` list (CPU last) and why a better one was not used."""

    device: str
    providers: list[tuple[str, dict]]
    fallback_reason: str | None = None

    @property
    def provider_names(self) -> list[str]:
        """Provider names only, in priority order."""
        return [name for name, _ in self.providers]


def _ort():
    # Imported lazily so that `onnxllm doctor` can still report a broken onnxruntime install.
    import onnxruntime

    return onnxruntime


def tiny_model_bytes() -> bytes:
    """A serialized one-node (Add) ONNX model used to check that a provider starts."""
    try:
        from onnx import TensorProto, helper
    except ImportError:
        return TINY_MODEL_BYTES
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in "abc"]
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "t", io[:2], io[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    return model.SerializeToString()


def _one_line(error: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def probe_provider(provider: str, options: dict | None = None) -> str | None:
    """Start `provider` on the tiny graph. None when it runs, else a one-line reason."""
    ort = _ort()
    if provider not in ort.get_available_providers():
        return f"{provider} is not offered by the installed onnxruntime"
    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: the reason is returned, not logged
    one = np.ones(1, dtype=np.float32)
    try:
        # enable_fallback=0: otherwise a failing provider is retried on CPU and the error is lost.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sess = ort.InferenceSession(
                tiny_model_bytes(), so, providers=[(provider, options or {})], enable_fallback=0
            )
            sess.run(None, {"a": one, "b": one})  # some drivers only fail at the first launch
    # Exception, not narrower: onnxruntime's Fail/EPFail/... derive from Exception directly.
    except Exception as error:
        return f"{provider} failed to start: {_one_line(error)}"
    used = sess.get_providers()
    if used and used[0] == provider:
        return None
    # ORT dropped the provider without raising (typical of missing CUDA/cuDNN libraries).
    why = ", ".join(f"{lib.soname} not found" for lib in find_cuda_libraries() if lib.found is None)
    if provider != CUDA or not why:
        why = f"the session ran on {used[0] if used else 'nothing'} instead"
    return f"{provider} failed to start: {why}"


class ProviderProbe:
    """A `probe` that remembers its results, for as long as the caller keeps this object."""

    def __init__(self, probe: Callable[[str], str | None] = probe_provider, maxsize: int = 16):
        # Per-instance cache: a module-level cache would outlive a changed environment.
        self._cached = functools.lru_cache(maxsize=maxsize)(probe)

    def __call__(self, provider: str) -> str | None:
        """The cached result of probing `provider`."""
        return self._cached(provider)


@dataclass(frozen=True)
class CudaLibrary:
    """A shared library the CUDA provider needs, and the file that loaded (None: missing)."""

    name: str
    candidates: tuple[str, ...]
    found: str | None

    @property
    def soname(self) -> str:
        """The name to show a user: the file found, else the newest one looked for."""
        return self.found or self.candidates[0]


# (library, Linux sonames, Windows DLLs): what the CUDA provider of onnxruntime-gpu loads.
_CUDA_LIBRARIES = (
    ("cudart", ("libcudart.so.12", "libcudart.so.13"), ("cudart64_12.dll", "cudart64_13.dll")),
    ("cublas", ("libcublas.so.12", "libcublas.so.13"), ("cublas64_12.dll", "cublas64_13.dll")),
    ("cudnn", ("libcudnn.so.9",), ("cudnn64_9.dll",)),
)


def _load_library(name: str) -> bool:
    # Loading, not ctypes.util.find_library: only the loader's own search path matters to ORT.
    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True


def find_cuda_libraries(
    *, system: str | None = None, loader: Callable[[str], bool] = _load_library
) -> tuple[CudaLibrary, ...]:
    """Which CUDA runtime, cuBLAS and cuDNN libraries the dynamic loader can open."""
    windows = (system or platform.system()) == "Windows"
    found = []
    for name, linux, dlls in _CUDA_LIBRARIES:
        candidates = dlls if windows else linux
        hit = next((c for c in candidates if loader(c)), None)
        found.append(CudaLibrary(name, candidates, hit))
    return tuple(found)


def installed_ort_packages() -> dict[str, str]:
    """Installed onnxruntime distributions (CPU, GPU, DirectML, ...) mapped to their versions."""
    versions = {}
    for package in ORT_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _not_used(device: str, reason: str) -> str:
    return f"{device.upper()} not used: {reason}"


def _not_installed(device: str) -> str:
    return f"{_PACKAGE_FOR_DEVICE[device]} is not installed ({INSTALL_HINTS[device]})"


def _choice(device: str, reason: str | None = None) -> ProviderChoice:
    providers = [(DEVICE_PROVIDERS[device], {})]
    if device != "cpu":
        providers.append((CPU, {}))  # CPU runs whatever the accelerator cannot
    return ProviderChoice(device, providers, reason)


def select_providers(
    device: str = "auto",
    *,
    available: Sequence[str] | None = None,
    probe: Callable[[str], str | None] | None = None,
) -> ProviderChoice:
    """Pick execution providers for `device` ("auto", "cpu", "cuda" or "dml").

    `available` defaults to `onnxruntime.get_available_providers()` and `probe` to
    `probe_provider` (pass a `ProviderProbe` to reuse results across calls).
    Raises DeviceError for an unknown device, or an explicit one that cannot run here.
    """
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)}")
    offered = list(_ort().get_available_providers() if available is None else available)
    probe = probe or probe_provider
    if device == "cpu":
        return _choice("cpu")  # every onnxruntime build has the CPU provider
    if device != "auto":
        return _explicit(device, offered, probe)
    reasons = []
    for candidate in AUTO_ORDER:
        provider = DEVICE_PROVIDERS[candidate]
        if provider not in offered:
            continue
        failure = probe(provider)
        if failure is None:
            return _choice(candidate, reason="; ".join(reasons) or None)
        reasons.append(_not_used(candidate, failure))
    if not reasons:
        # Nothing GPU-capable installed: point at the usual upgrade, CUDA.
        reasons.append(_not_used("cuda", _not_installed("cuda")))
    return _choice("cpu", reason="; ".join(reasons))


def _explicit(device: str, offered: list[str], probe: Callable[[str], str | None]) -> ProviderChoice:
    # An explicit device either runs or raises: failing beats a silent CPU run.
    provider = DEVICE_PROVIDERS[device]
    if provider not in offered:
        raise DeviceError(
            f"device {device!r} needs {provider}, which the installed onnxruntime does not offer "
            f"(available here: {', '.join(offered) or 'none'}); install it with: "
            f"{INSTALL_HINTS[device]}"
        )
    failure = probe(provider)
    if failure is not None:
        raise DeviceError(
            f"device {device!r} is installed but does not start: {failure}; "
            "run `onnxllm doctor` for details, or use --device cpu"
        )
    return _choice(device)


def default_threads() -> int:
    """Cores this process may use (affinity-aware where the OS tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def session_options(
    *,
    threads: int | None = None,
    optimization: str = "all",
    spinning: bool | None = None,
    optimized_model_path: str | None = None,
) -> onnxruntime.SessionOptions:
    """SessionOptions for LLM decoding: sequential, one inter-op thread, `threads` intra-op.

    `threads=None` uses every core this process may run on (onnxruntime's own default counts
    physical cores and measured 3x slower decode on a 2-vCPU VM); `optimization` is
    disable/basic/extended/all; `spinning=None` keeps the default busy-wait behaviour.
    """
    ort = _ort()
    if threads is not None and threads < 1:
        raise DeviceError(f"threads must be at least 1, got {threads}")
    if optimization not in _OPTIMIZATION_LEVELS:
        names = ", ".join(_OPTIMIZATION_LEVELS)
        raise DeviceError(f"unknown optimization level {optimization!r}; choose one of: {names}")
    so = ort.SessionOptions()
    # ORT warns about things users cannot act on (e.g. our overridable num_logits_to_keep input);
    # errors still come through, as exceptions that onnxllm turns into one-line messages.
    so.log_severity_level = 3
    # Without ORT's CPU arena, buffers for a long prefill go back to the OS afterwards instead of
    # staying reserved for the life of the session (the soak benchmark showed a +50 MiB step that
    # never came back); decode speed measured the same either way.
    so.enable_cpu_mem_arena = False
    level = _OPTIMIZATION_LEVELS[optimization]
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    # A decoder is a chain of dependent ops: parallel branches gain nothing, and
    # DirectML refuses parallel execution outright.
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    so.intra_op_num_threads = threads if threads is not None else default_threads()
    if spinning is not None:
        # Spinning lowers per-token latency but burns a core while idle between tokens.
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    return so

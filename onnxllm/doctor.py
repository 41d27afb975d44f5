"""`onnxllm doctor`: a plain-text report of what this machine can run, for bug reports.

Every check is a small function returning `DoctorLine`s; `run_doctor` gathers them and
`format_report` renders them. Facts that vary between machines (installed packages,
providers, CUDA libraries, importable modules) can be injected, so tests can show the
conflict and missing-library paths on a CPU-only machine.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .catalog import cache_dir
from .runtime import providers as prov

STATUSES = ("info", "ok", "warn", "fail")

# Packages of the `export` extra; only looked up, never imported (the runtime must not).
_EXPORT_MODULES = (("torch", "torch"), ("transformers", "transformers"), ("onnx", "onnx"))

_CUDA_WHEELS = "pip install nvidia-cuda-runtime-cu12 nvidia-cublas-cu12 nvidia-cudnn-cu12"


@dataclass(frozen=True)
class DoctorLine:
    """One finding: a label, its value, a status (info/ok/warn/fail) and an optional fix."""

    label: str
    value: str
    status: str = "info"
    hint: str | None = None


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_system() -> list[DoctorLine]:
    """Python, platform, CPUs and the onnxllm version."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        DoctorLine("python", f"{platform.python_version()} ({sys.executable})"),
        DoctorLine("platform", f"{platform.platform()} {platform.machine()}"),
        DoctorLine("cpus", f"{os.cpu_count()} logical, {usable} usable by this process"),
        DoctorLine("onnxllm", _version("onnxllm") or "not installed (running from a source tree)"),
    ]


def check_packages(packages: Mapping[str, str]) -> list[DoctorLine]:
    """The onnxruntime distributions installed; more than one is a broken install."""
    if not packages:
        return [DoctorLine("onnxruntime", "not installed", "fail", "pip install onnxruntime")]
    lines = [DoctorLine("package", f"{name} {version}") for name, version in packages.items()]
    if len(packages) > 1:
        names = sorted(packages)
        # Keep the accelerated one: whoever installed it wanted the GPU.
        keep = next((p for p in prov.ORT_PACKAGES[1:] if p in packages), names[0])
        lines.append(
            DoctorLine(
                "conflict",
                f"{' and '.join(names)} are all installed: they ship the same `onnxruntime` "
                "module and overwrite each other's files",
                "warn",
                f"pip uninstall -y {' '.join(names)} && pip install {keep}",
            )
        )
    return lines


def check_onnxruntime(
    available: Sequence[str], probe: Callable[[str], str | None]
) -> list[DoctorLine]:
    """The providers the installed onnxruntime offers, each started on a tiny graph."""
    offered = ", ".join(available) or "none"
    lines = [DoctorLine("providers offered", offered, "ok" if available else "fail")]
    for provider in available:
        failure = probe(provider)
        if failure is None:
            lines.append(DoctorLine(provider, "ok", "ok"))
        else:
            lines.append(DoctorLine(provider, f"failed: {failure}", "fail"))
    if not available:
        return lines
    choice = prov.select_providers("auto", available=available, probe=probe)
    lines.append(DoctorLine("--device auto uses", choice.device, "ok"))
    if choice.fallback_reason:
        lines.append(DoctorLine("why not faster", choice.fallback_reason))
    return lines


def check_cuda_libraries(
    libraries: Sequence[prov.CudaLibrary], cuda_offered: bool, preload_available: bool
) -> list[DoctorLine]:
    """Whether the CUDA runtime, cuBLAS and cuDNN libraries load, and what to do if not."""
    # Missing libraries only matter once onnxruntime-gpu is there to need them.
    missing_status = "fail" if cuda_offered else "info"
    lines = []
    for lib in libraries:
        label = f"cuda library {lib.name}"
        if lib.found:
            lines.append(DoctorLine(label, f"found ({lib.found})", "ok"))
        else:
            looked = " or ".join(lib.candidates)
            lines.append(DoctorLine(label, f"missing ({looked})", missing_status))
    if cuda_offered and any(lib.found is None for lib in libraries):
        fix = _CUDA_WHEELS
        if preload_available:
            fix += ", then call onnxruntime.preload_dlls() before creating a session"
        else:
            fix += ", and add their lib folders to LD_LIBRARY_PATH (or PATH on Windows)"
        lines.append(DoctorLine("cuda libraries", "CUDA provider cannot start", "fail", fix))
    return lines


def check_export_extra(find_spec: Callable[[str], object | None]) -> list[DoctorLine]:
    """Whether torch/transformers/onnx (the `export` extra) are importable; never imports them."""
    lines = []
    for module, distribution in _EXPORT_MODULES:
        if find_spec(module) is None:
            absent = "not installed (needed only to export: pip install onnxllm[export])"
            lines.append(DoctorLine(module, absent))
        else:
            version = _version(distribution) or "unknown version"
            lines.append(DoctorLine(module, f"{version} (export extra)", "ok"))
    return lines


def _default_threads() -> str:
    from .runtime.providers import default_threads

    return f"{default_threads()} (every core this process may use); change with --threads N"


def check_settings(environ: Mapping[str, str]) -> list[DoctorLine]:
    """The thread count sessions will use and the model cache folder."""
    folder = cache_dir(environ)
    source = "$ONNXLLM_CACHE" if environ.get("ONNXLLM_CACHE") else "default"
    if folder.is_dir():
        writable = os.access(folder, os.W_OK)
        state, status = ("writable", "ok") if writable else ("NOT writable", "fail")
    else:
        state, status = "not created yet", "info"
    return [
        DoctorLine("threads", _default_threads()),
        DoctorLine("cache folder", f"{folder} ({source}, {state})", status),
    ]


def _safe(label: str, check: Callable[[], list[DoctorLine]]) -> list[DoctorLine]:
    # The doctor runs on broken installs: one failing check must not hide all the others.
    try:
        return check()
    except Exception as error:  # noqa: BLE001 - reported, not swallowed
        return [DoctorLine(label, f"check crashed: {type(error).__name__}: {error}", "fail")]


def _ort_facts() -> tuple[list[str], bool]:
    import onnxruntime

    return list(onnxruntime.get_available_providers()), hasattr(onnxruntime, "preload_dlls")


def run_doctor(
    *,
    packages: Mapping[str, str] | None = None,
    available: Sequence[str] | None = None,
    probe: Callable[[str], str | None] | None = None,
    cuda_libraries: Sequence[prov.CudaLibrary] | None = None,
    find_spec: Callable[[str], object | None] | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[DoctorLine]:
    """Run every check; each argument left None is read from this machine."""
    packages = prov.installed_ort_packages() if packages is None else packages
    environ = os.environ if environ is None else environ
    lines = _safe("system", check_system) + _safe("packages", lambda: check_packages(packages))
    try:
        offered, preload = _ort_facts()
    except Exception as error:  # noqa: BLE001 - a broken onnxruntime is exactly what to report
        fix = "pip install --force-reinstall onnxruntime (or the -gpu/-directml one you use)"
        lines.append(DoctorLine("import onnxruntime", f"failed: {error}", "fail", fix))
        offered, preload = [], False
    offered = list(offered if available is None else available)
    probe = probe or prov.ProviderProbe()  # one probe per provider, shared with select_providers
    lines += _safe("onnxruntime", lambda: check_onnxruntime(offered, probe))
    if cuda_libraries is None and platform.system() == "Darwin":
        lines.append(DoctorLine("cuda libraries", "not applicable on macOS"))
    else:
        libs = prov.find_cuda_libraries() if cuda_libraries is None else cuda_libraries
        lines += _safe("cuda", lambda: check_cuda_libraries(libs, prov.CUDA in offered, preload))
    lines += _safe("export", lambda: check_export_extra(find_spec or importlib.util.find_spec))
    lines += _safe("settings", lambda: check_settings(environ))
    return lines


def format_report(lines: Sequence[DoctorLine]) -> str:
    """Plain text, one finding per line, fixes indented below, a summary at the end."""
    width = max((len(line.label) for line in lines), default=0) + 1
    out = ["onnxllm doctor"]
    for line in lines:
        mark = {"warn": "WARNING: ", "fail": "PROBLEM: "}.get(line.status, "")
        out.append(f"  {line.label + ':':<{width}} {mark}{line.value}")
        if line.hint:
            out.append(f"  {'':<{width}}   fix: {line.hint}")
    problems = sum(line.status in ("warn", "fail") for line in lines)
    out.append(f"{problems} problem(s) found." if problems else "No problems found.")
    return "\n".join(out) + "\n"

"""The doctor report: real checks on this machine, and injected broken installs."""

from pathlib import Path

import pytest

from onnxllm.catalog import cache_dir
from onnxllm.doctor import (
    DoctorLine,
    check_cuda_libraries,
    check_packages,
    format_report,
    run_doctor,
)
from onnxllm.runtime.providers import CPU, CUDA, CudaLibrary

MISSING_CUDA = (
    CudaLibrary("cudart", ("libcudart.so.12", "libcudart.so.13"), "libcudart.so.12"),
    CudaLibrary("cublas", ("libcublas.so.12", "libcublas.so.13"), None),
    CudaLibrary("cudnn", ("libcudnn.so.9",), None),
)


def _line(report: str, label: str) -> str:
    return next(line for line in report.splitlines() if line.strip().startswith(label + ":"))


def test_real_report_on_this_machine(tmp_path):
    report = format_report(run_doctor(environ={"ONNXLLM_CACHE": str(tmp_path)}))
    assert report.startswith("onnxllm doctor\n")
    assert _line(report, CPU).split(":", 1)[1].strip() == "ok"
    for label in ("python", "platform", "cpus", "onnxllm", "package", "providers offered",
                  "--device auto uses", "threads", "cache folder", "torch", "transformers"):
        assert _line(report, label)
    assert str(tmp_path) in _line(report, "cache folder")
    assert "writable" in _line(report, "cache folder")
    assert "onnxruntime " in _line(report, "package")


def test_conflicting_packages_warn_with_fix():
    packages = {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.32.0"}
    report = format_report(run_doctor(packages=packages, available=[CPU], probe=lambda p: None))
    assert "overwrite each other" in report
    assert "WARNING:" in report
    assert "fix: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in report
    assert "problem(s) found" in report


def test_no_conflict_for_a_single_package():
    lines = check_packages({"onnxruntime": "1.32.0"})
    assert [line.status for line in lines] == ["info"]


def test_no_onnxruntime_installed_is_a_problem():
    (line,) = check_packages({})
    assert line.status == "fail" and line.hint == "pip install onnxruntime"


def test_missing_cuda_libraries_with_cuda_offered():
    report = format_report(
        run_doctor(
            available=[CUDA, CPU],
            probe=lambda p: "CUDAExecutionProvider failed to start: libcudnn.so.9 not found"
            if p == CUDA
            else None,
            cuda_libraries=MISSING_CUDA,
        )
    )
    assert "missing (libcudnn.so.9)" in report
    assert "missing (libcublas.so.12 or libcublas.so.13)" in report
    assert "found (libcudart.so.12)" in report
    assert "pip install nvidia-cuda-runtime-cu12 nvidia-cublas-cu12 nvidia-cudnn-cu12" in report
    assert "failed: CUDAExecutionProvider failed to start: libcudnn.so.9 not found" in report
    assert _line(report, "--device auto uses").endswith("cpu")
    assert "CUDA not used:" in _line(report, "why not faster")


def test_cuda_fix_mentions_preload_dlls_only_when_present():
    with_preload = check_cuda_libraries(MISSING_CUDA, cuda_offered=True, preload_available=True)
    without = check_cuda_libraries(MISSING_CUDA, cuda_offered=True, preload_available=False)
    assert "onnxruntime.preload_dlls()" in with_preload[-1].hint
    assert "LD_LIBRARY_PATH" in without[-1].hint


def test_missing_cuda_libraries_without_onnxruntime_gpu_are_not_problems():
    lines = check_cuda_libraries(MISSING_CUDA, cuda_offered=False, preload_available=True)
    assert "missing (libcudnn.so.9)" in format_report(lines)
    assert all(line.status != "fail" for line in lines)


def test_export_extra_not_installed():
    report = format_report(run_doctor(available=[CPU], find_spec=lambda name: None))
    assert "pip install onnxllm[export]" in _line(report, "torch")


def test_doctor_never_imports_torch():
    import subprocess
    import sys

    code = (
        "import sys; from onnxllm.doctor import run_doctor, format_report; "
        "format_report(run_doctor()); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cache_dir(tmp_path):
    assert cache_dir({"ONNXLLM_CACHE": str(tmp_path)}) == tmp_path
    assert cache_dir({"ONNXLLM_CACHE": "~/x"}) == Path.home() / "x"
    assert cache_dir({}) == Path.home() / ".cache" / "onnxllm"


def test_threads_line_matches_sessions():
    from onnxllm.runtime.providers import default_threads

    assert str(default_threads()) in format_report(run_doctor())

def test_format_report_shape():
    text = format_report([DoctorLine("a", "1"), DoctorLine("long label", "bad", "fail", "do x")])
    assert text.splitlines() == [
        "onnxllm doctor",
        "  a:          1",
        "  long label: PROBLEM: bad",
        "                fix: do x",
        "1 problem(s) found.",
    ]


@pytest.mark.parametrize("status", ["ok", "info"])
def test_format_report_no_problems(status):
    assert format_report([DoctorLine("a", "1", status)]).endswith("No problems found.\n")

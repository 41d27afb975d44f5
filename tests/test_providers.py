"""Provider selection, probing and session options (CPU only; accelerators are injected)."""

import sys

import numpy as np
import onnxruntime as ort
import pytest

from onnxllm.errors import DeviceError
from onnxllm.runtime import providers as prov
from onnxllm.runtime.providers import (
    default_threads,
    CPU,
    CUDA,
    DML,
    DEVICES,
    ProviderChoice,
    ProviderProbe,
    installed_ort_packages,
    probe_provider,
    select_providers,
    session_options,
)


def ok(_provider):
    return None


def failing(*names, reason="libcudnn.so.9 not found"):
    def probe(provider):
        return f"{provider} failed to start: {reason}" if provider in names else None

    return probe


def test_devices():
    assert DEVICES == ("auto", "cpu", "cuda", "dml")


def test_auto_prefers_cuda_when_it_starts():
    choice = select_providers(available=[CUDA, DML, CPU], probe=ok)
    assert choice == ProviderChoice("cuda", [(CUDA, {}), (CPU, {})], None)
    assert choice.provider_names == [CUDA, CPU]


def test_auto_cuda_present_but_failing_falls_back_with_reason():
    choice = select_providers(available=[CUDA, CPU], probe=failing(CUDA))
    assert choice.device == "cpu"
    assert choice.providers == [(CPU, {})]
    assert choice.fallback_reason == (
        "CUDA not used: CUDAExecutionProvider failed to start: libcudnn.so.9 not found"
    )
    assert "\n" not in choice.fallback_reason


def test_auto_cuda_failing_falls_back_to_dml():
    choice = select_providers(available=[CUDA, DML, CPU], probe=failing(CUDA))
    assert choice.device == "dml"
    assert choice.providers == [(DML, {}), (CPU, {})]
    assert choice.fallback_reason.startswith("CUDA not used:")


def test_auto_takes_dml_without_cuda():
    choice = select_providers(available=[DML, CPU], probe=ok)
    assert choice == ProviderChoice("dml", [(DML, {}), (CPU, {})], None)


def test_auto_cpu_only_says_how_to_get_cuda():
    choice = select_providers(available=[CPU], probe=ok)
    assert choice.device == "cpu"
    assert choice.providers == [(CPU, {})]
    assert "onnxruntime-gpu is not installed" in choice.fallback_reason
    assert "pip install onnxruntime-gpu" in choice.fallback_reason


def test_auto_does_not_probe_what_is_not_offered():
    probed = []
    select_providers(available=[DML, CPU], probe=lambda p: probed.append(p))
    assert probed == [DML]


def test_explicit_device_started():
    assert select_providers("cuda", available=[CUDA, CPU], probe=ok).providers == [
        (CUDA, {}),
        (CPU, {}),
    ]
    assert select_providers("cpu", available=[CPU], probe=ok).providers == [(CPU, {})]


@pytest.mark.parametrize("device, package", [("cuda", "onnxruntime-gpu"), ("dml", "onnxruntime-directml")])
def test_explicit_unavailable_raises_with_available_and_install(device, package):
    with pytest.raises(DeviceError) as info:
        select_providers(device, available=["AzureExecutionProvider", CPU], probe=ok)
    message = str(info.value)
    assert "AzureExecutionProvider, CPUExecutionProvider" in message
    assert f"pip install {package}" in message


def test_explicit_present_but_failing_raises():
    with pytest.raises(DeviceError, match="libcudnn.so.9 not found"):
        select_providers("cuda", available=[CUDA, CPU], probe=failing(CUDA))


def test_unknown_device_lists_valid_ones():
    with pytest.raises(DeviceError, match="auto, cpu, cuda, dml"):
        select_providers("tpu", available=[CPU], probe=ok)


def test_real_cpu_probe_and_real_selection():
    assert probe_provider(CPU) is None
    choice = select_providers("auto")  # real onnxruntime, real probe
    assert choice.providers[-1] == (CPU, {})
    assert choice.device in ("cpu", "cuda", "dml")


def test_probe_of_provider_not_offered():
    if CUDA in ort.get_available_providers():
        pytest.skip("CUDA is offered here")
    assert "not offered" in probe_provider(CUDA)


@pytest.mark.parametrize("model", [prov.TINY_MODEL_BYTES, prov.tiny_model_bytes()])
def test_tiny_model_runs(model):
    # The constant is what installs without `onnx` use: it must load and compute a + b.
    sess = ort.InferenceSession(model, providers=[CPU])
    feeds = {"a": np.array([1.5], np.float32), "b": np.array([2.0], np.float32)}
    (out,) = sess.run(None, feeds)
    assert out.tolist() == [3.5]


def test_tiny_model_without_onnx_is_the_constant(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    assert prov.tiny_model_bytes() is prov.TINY_MODEL_BYTES


def test_tiny_model_constant_matches_onnx_helper():
    pytest.importorskip("onnx")
    assert prov.tiny_model_bytes() == prov.TINY_MODEL_BYTES


def test_provider_probe_caches_per_instance():
    calls = []

    def probe(provider):
        calls.append(provider)
        return None

    first = ProviderProbe(probe)
    first(CPU)
    first(CPU)
    ProviderProbe(probe)(CPU)
    assert calls == [CPU, CPU]  # once per instance


def test_find_cuda_libraries_injected_loader():
    libs = prov.find_cuda_libraries(system="Linux", loader=lambda name: name == "libcudart.so.12")
    assert [(lib.name, lib.found) for lib in libs] == [
        ("cudart", "libcudart.so.12"),
        ("cublas", None),
        ("cudnn", None),
    ]
    assert libs[2].soname == "libcudnn.so.9"
    windows = prov.find_cuda_libraries(system="Windows", loader=lambda name: False)
    assert windows[2].candidates == ("cudnn64_9.dll",)


def test_session_options():
    so = session_options(threads=3, optimization="basic", spinning=False, optimized_model_path="x.onnx")
    assert so.intra_op_num_threads == 3
    assert so.inter_op_num_threads == 1
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.optimized_model_filepath == "x.onnx"


def test_session_options_defaults():
    so = session_options()
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.intra_op_num_threads == default_threads()  # every core we may use, not ORT's physical-core guess
    with pytest.raises(Exception, match="does not have configuration"):
        so.get_session_config_entry("session.intra_op.allow_spinning")  # left at ORT's default
    assert session_options(spinning=True).get_session_config_entry(
        "session.intra_op.allow_spinning"
    ) == "1"
    assert (
        session_options(optimization="disable").graph_optimization_level
        == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )


@pytest.mark.parametrize("kwargs", [{"threads": 0}, {"optimization": "max"}])
def test_session_options_rejects_bad_values(kwargs):
    with pytest.raises(DeviceError):
        session_options(**kwargs)


def test_session_options_work_for_a_real_session():
    sess = ort.InferenceSession(
        prov.TINY_MODEL_BYTES, session_options(threads=1, spinning=False), providers=[CPU]
    )
    assert sess.get_providers()[0] == CPU


def test_installed_ort_packages():
    packages = installed_ort_packages()
    assert set(packages) <= set(prov.ORT_PACKAGES)
    assert packages  # this environment has some onnxruntime wheel
    assert all(isinstance(version, str) and version for version in packages.values())

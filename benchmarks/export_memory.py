"""Export and quantize time and peak memory on random-weight checkpoints of real models' shapes.

    python benchmarks/export_memory.py --shape qwen2.5-0.5b [--shape llama-3.2-1b] [--workdir DIR] [--keep]
                                       [--quantize int4|int8-dynamic]... [--no-quantize]

Each step runs in its own Python process, which reports its own peak RSS (ru_maxrss), so one step's memory
never hides another's: make the checkpoint (float32 safetensors, random weights, a small byte-level BPE
tokenizer), export --no-verify, export with verification, quantize int4 and int8-dynamic (evaluate=False).
The yardstick is the weights' float32 size. Not a timed test: timings move with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # Qwen2.5-0.5B: 494M parameters, qkv biases, tied embeddings.
    "qwen2.5-0.5b": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "max_position_embeddings": 32768, "tie_word_embeddings": True, "rope_theta": 1000000.0},
    # Llama-3.2-1B: 1.24B parameters, llama3 rope scaling, tied embeddings.
    "llama-3.2-1b": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "tie_word_embeddings": True, "rope_parameters": {
                         "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
}

# Each step: Python source run in a fresh interpreter with ARGS (a dict) defined; it prints one JSON line.
_MAKE = """
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
shape = dict(ARGS["shape"]); model_type = shape.pop("model_type")
config = AutoConfig.for_model(model_type, **shape, eos_token_id=0, bos_token_id=0)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.save_pretrained(ARGS["out"], safe_serialization=True)
vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="!", bos_token="!").save_pretrained(ARGS["out"])
print(json.dumps({}))
"""
_SIZE = """
from onnxllm.exporter.safetensors_reader import SafetensorsStateDict
print(json.dumps({"fp32_bytes": SafetensorsStateDict(ARGS["ckpt"]).fp32_bytes()}))
"""
_EXPORT = """
from onnxllm.exporter.export import ExportOptions, export
export(ARGS["ckpt"], ARGS["out"], options=ExportOptions(verify=ARGS["verify"], force=True))
print(json.dumps({}))
"""
_QUANTIZE = """
from onnxllm.quantize import QuantizeOptions, quantize
quantize(ARGS["pkg"], ARGS["scheme"], QuantizeOptions(evaluate=False, force=True))
print(json.dumps({}))
"""
_PRELUDE = "import json, resource, sys, time\nARGS = json.loads(sys.argv[1])\n_t = time.perf_counter()\n"
_EPILOGUE = ("\nprint(json.dumps({'wall_s': round(time.perf_counter() - _t, 1), "
             "'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))\n")


def _step(code: str, args: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-c", _PRELUDE + code + _EPILOGUE, json.dumps(args)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"step failed:\n{proc.stderr[-3000:]}")
    result: dict = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            result.update(json.loads(line))
    return result


def _machine() -> str:
    import onnxruntime
    import torch
    import transformers

    import onnxllm

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM; "
            f"Python {platform.python_version()}, onnxllm {onnxllm.__version__}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, onnxruntime {onnxruntime.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), required=True)
    parser.add_argument("--workdir", type=Path, default=None, help="where checkpoints and packages go (temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and packages (reused next run)")
    parser.add_argument("--quantize", action="append", choices=["int4", "int8-dynamic"], default=None,
                        help="schemes to quantize to (default: both); int8-dynamic needs ~5x the weights today")
    parser.add_argument("--no-quantize", action="store_true", help="export steps only")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="onnxllm-export-memory-"))
    print(f"machine: {_machine()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"{'shape':<14} {'step':<22} {'wall s':>7} {'peak RSS MiB':>13} {'x fp32 weights':>15}")
    try:
        for shape in args.shape:
            ckpt, pkg = work / f"{shape}-ckpt", work / f"{shape}-pkg"
            if not (ckpt / "config.json").is_file():  # a kept workdir's checkpoint is reused
                _step(_MAKE, {"shape": SHAPES[shape], "out": str(ckpt)})
            weights_mib = _step(_SIZE, {"ckpt": str(ckpt)})["fp32_bytes"] / 2**20
            print(f"{shape:<14} {'(fp32 weights)':<22} {'':>7} {weights_mib:>13.0f} {1.0:>15.2f}", flush=True)
            steps = [("export --no-verify", _EXPORT, {"ckpt": str(ckpt), "out": str(pkg), "verify": False}),
                     ("export (verify)", _EXPORT, {"ckpt": str(ckpt), "out": str(pkg), "verify": True})]
            for scheme in [] if args.no_quantize else (args.quantize or ["int4", "int8-dynamic"]):
                steps.append((f"quantize {scheme}", _QUANTIZE, {"pkg": str(pkg), "scheme": scheme}))
            for name, code, step_args in steps:
                r = _step(code, step_args)
                print(f"{shape:<14} {name:<22} {r['wall_s']:>7.1f} {r['peak_rss_mib']:>13} "
                      f"{r['peak_rss_mib'] / weights_mib:>15.2f}", flush=True)
            if not args.keep:
                shutil.rmtree(ckpt)
                shutil.rmtree(pkg)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"finished {time.strftime('%Y-%m-%d %H:%M:%S')}")


if __name__ == "__main__":
    main()

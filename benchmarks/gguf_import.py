"""What the gguf scheme keeps of llama.cpp's requantized SmolLM2 files, against each file's own fp32 export.

    python benchmarks/gguf_import.py [--dir ~/.cache/onnxllm/requantized] [--tokens 256] [KIND ...]

For each SmolLM2-135M-Instruct.KIND.gguf (made by scripts/make_gguf_fixtures.py): export it, add the
gguf variant (accuracy level 1: fp32 arithmetic, and 4: int8 activations, the CPU default) and int4,
and print size, top-1 agreement, KL and perplexity change against the file's fp32 graph on Hamlet.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kinds", nargs="*", default=["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"])
    parser.add_argument("--dir", default=os.environ.get("ONNXLLM_GGUF_DIR",
                                                          str(Path.home() / ".cache" / "onnxllm" / "requantized")))
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()

    import gguf
    import onnxruntime

    from onnxllm import __version__
    from onnxllm.api import export, quantize

    print(f"# {' '.join(sys.argv)}")
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"onnxllm {__version__}, onnxruntime {onnxruntime.__version__}, "
        f"gguf {getattr(gguf, '__version__', '?')}"
    )
    print("| file | variant | MiB | % of fp32 | top-1 | KL | perplexity | imported | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|")
    for kind in args.kinds:
        path = Path(args.dir) / f"SmolLM2-135M-Instruct.{kind}.gguf"
        if not path.is_file():
            print(f"| {kind} | missing: run scripts/make_gguf_fixtures.py | | | | | | | |")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            pkg = export(path, Path(tmp) / "pkg")
            for scheme, level in (("gguf", 1), ("gguf", 4), ("int4", 4)):
                started = time.perf_counter()
                r = quantize(pkg, scheme, accuracy_level=level, eval_tokens=args.tokens, force=True)
                g = r.method.gguf or {}
                imported = ", ".join(f"{k} {n}" for k, n in g.get("types", {}).items())
                if g.get("requantized"):
                    imported += f"; {g['requantized']} re-quantized"
                q = r.quality
                print(f"| {kind} | {scheme} (accuracy {level}) | {r.bytes / 2**20:.1f} | {r.size_ratio:.1%} | "
                      f"{q.top1_agreement:.1%} | {q.kl_divergence:.4f} | {q.perplexity_change:+.1%} | {imported} | "
                      f"{time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()

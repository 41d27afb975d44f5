#!/usr/bin/env python3
"""Variants of one package side by side in one process, interleaved round by round, so that whatever else
the machine runs slows them alike: their ratios hold up on a busy machine where absolute numbers do not.

    .venv/bin/python benchmarks/variant_speed.py PKG --variants int8-dynamic,int4-exact,fp32 --rounds 5

Per round and variant: a prefill of the first N tokens of Hamlet (each --prompt-tokens), then G greedy tokens
one per step (drafts off), through the runtime's own session and loop. Prints medians over rounds and each
variant's ratio to the first.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("package")
    p.add_argument("--variants", required=True)
    p.add_argument("--prompt-tokens", default="64,512")
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    import onnxruntime

    import onnxllm
    from onnxllm.quantize.quality import hamlet_text
    from onnxllm.runtime.generate import GenerationConfig, generate_tokens

    names = a.variants.split(",")
    lengths = [int(x) for x in a.prompt_tokens.split(",")]
    models = {}
    for n in names:
        t = time.perf_counter()
        models[n] = onnxllm.load(a.package, device="cpu", variant=n, threads=a.threads)
        print(f"loaded {n} in {time.perf_counter() - t:.2f} s", flush=True)
    ids = models[names[0]].encode(hamlet_text())
    prompts = {n: ids[:n] for n in lengths}
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at start; onnxllm {onnxllm.__version__}, onnxruntime {onnxruntime.__version__}")
    prefill = {(v, n): [] for v in names for n in lengths}
    decode = {(v, n): [] for v in names for n in lengths}
    config = GenerationConfig(max_tokens=a.gen, draft_tokens=0)
    for r in range(a.rounds + 1):  # round 0 warms up
        for n in lengths:
            for v in names:
                s = models[v].session
                s.rewind(0)
                timings = list(generate_tokens(s, prompts[n], config))[-1].timings
                if r:
                    prefill[(v, n)].append(n / timings.prefill_s)
                    decode[(v, n)].append(timings.decode_tokens_per_s)
    print(f"load average {os.getloadavg()[0]:.1f} at the end; medians of {a.rounds} rounds, one token per step\n")
    head = " | ".join(f"prefill @{n} | decode @{n}" for n in lengths)
    print(f"| variant | {head} |")
    print("|---|" + "---:|---:|" * len(lengths))
    base = names[0]
    for v in names:
        cells = []
        for n in lengths:
            pf, dc = statistics.median(prefill[(v, n)]), statistics.median(decode[(v, n)])
            pf0, dc0 = statistics.median(prefill[(base, n)]), statistics.median(decode[(base, n)])
            cells += [f"{pf:.0f} ({pf / pf0:.2f}x)", f"{dc:.1f} ({dc / dc0:.2f}x)"]
        print(f"| {v} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

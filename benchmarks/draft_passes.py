#!/usr/bin/env python3
"""What prompt-lookup drafts buy a variant, from pass counts: deterministic, so it compares runs and code
versions without timing noise.

    .venv/bin/python benchmarks/draft_passes.py PKG [--variant int4-exact]

compare.py's workloads through the runtime's own loop: Hamlet continued for 128 tokens after 64 and 512
prompt tokens (greedy), and the eight chat instructions answered to EOS or 128 tokens (greedy, and at
temperature 0.7 with seed 1234 + i). For each, with drafts off and on, it counts the tokens and the decode
passes by width, and models their cost with the variant's verify-cost hint (runtime/lookup.verify_cost: a
one-token pass costs 1, a verify pass of g guesses fixed + per_guess * g). Prints tokens per unit of cost:
1.0 is one token per step; above it drafts pay.
"""

from __future__ import annotations

import argparse

from compare_lib.workloads import CHAT_INSTRUCTIONS, CHAT_SYSTEM, CHAT_TEMPERATURE  # the script's folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("package")
    p.add_argument("--variant", default=None, help="default: the package's CPU default")
    p.add_argument("--draft-tokens", type=int, default=None, help="default: GenerationConfig's")
    a = p.parse_args()

    import onnxllm
    from onnxllm.quantize.quality import hamlet_text
    from onnxllm.runtime.generate import GenerationConfig, generate_tokens

    if a.draft_tokens is None:
        a.draft_tokens = GenerationConfig().draft_tokens

    model = onnxllm.load(a.package, device="cpu", variant=a.variant)
    session = model.session
    fixed, per_guess = session.verify_cost
    widths: list[int] = []
    forward = session.forward

    def counted(ids, *, all_logits=False):
        widths.append(len(ids))
        return forward(ids, all_logits=all_logits)

    session.forward = counted
    eos = model.manifest.eos_token_ids

    def answer(prompt: list[int], draft: int, temperature: float, seed: int | None) -> tuple[int, float]:
        session.rewind(0)
        config = GenerationConfig(max_tokens=128, draft_tokens=draft, temperature=temperature, seed=seed)
        widths.clear()
        events = list(generate_tokens(session, prompt, config, eos_ids=eos))
        decode = widths[len(widths) - events[-1].timings.decode_passes:]  # the passes after the prefill's
        cost = sum(1.0 if w == 1 else fixed + per_guess * (w - 1) for w in decode)
        return sum(e.token is not None for e in events), cost

    hamlet = model.encode(hamlet_text())
    chats = [model.prompt_ids(text, chat=True, system=CHAT_SYSTEM) for text in CHAT_INSTRUCTIONS]
    workloads = [("Hamlet @64", [hamlet[:64]], 0.0), ("Hamlet @512", [hamlet[:512]], 0.0),
                 ("chat, greedy", chats, 0.0), ("chat, sampled", chats, CHAT_TEMPERATURE)]
    print(f"{model.variant}: verify cost hint {fixed} + {per_guess} per guess (one-token pass = 1)")
    print(f"| workload | no drafts | drafts ({a.draft_tokens}) |\n|---|---:|---:|")
    for name, prompts, temperature in workloads:
        cells = []
        for draft in (0, a.draft_tokens):
            tokens = cost = 0.0
            for i, prompt in enumerate(prompts):
                n, c = answer(prompt, draft, temperature, 1234 + i if temperature else None)
                tokens, cost = tokens + n, cost + c
            cells.append(f"{tokens / cost:.2f} ({int(tokens)} tokens)")
        print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()

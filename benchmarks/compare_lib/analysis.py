"""Post-processing of the worker results: merging retried attempts, the bandwidth ceiling of decode,
and the greedy agreement with onnxllm fp32."""

from __future__ import annotations

import json
from pathlib import Path

from .common import KV_BYTES, LOOKUP


def merge_attempts(attempts: list[dict]) -> dict:
    """Per prompt length, keep the attempt that other processes disturbed least."""
    best = dict(min(attempts, key=lambda r: r["other_cores_during"]))
    results = []
    for i in range(len(best["results"])):
        results.append(min((a["results"][i] for a in attempts), key=lambda x: x.get("other_cores", 0.0)))
    best["results"] = results
    best["attempts"] = len(attempts)
    best["peak_rss_mib"] = max(a["peak_rss_mib"] for a in attempts)
    best["load_s"] = min(a["load_s"] for a in attempts)
    return best


def disturbance(r: dict) -> float:
    return max(x.get("other_cores", r["other_cores_during"]) for x in r["results"])


def onnx_file_for(row: dict) -> Path | None:
    """The .onnx file a row's worker ran, for the ONNX runtimes."""
    d = Path(row["model"])
    if row["runtime"] == "onnxllm":
        try:
            manifest = json.loads((d / "onnxllm.json").read_text())
            return d / manifest["variants"][row.get("variant_resolved", row["variant"])]["file"]
        except (OSError, KeyError, ValueError):
            return None
    if row["runtime"] == "genai":
        files = sorted(d.glob("*.onnx"))
        return files[0] if files else None
    if row["runtime"] == "optimum":
        return d / ("model_quantized.onnx" if row["variant"] == "int8" else "model.onnx")
    return None


_ONNX_ELEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2, 21: 1, 22: 1}


def onnx_weight_bytes_per_token(path: Path) -> dict | None:
    """Bytes of initializers one decode step reads: all of them, except tables only Gather-type nodes use
    (an embedding not shared with the lm_head, its scales), of which a token reads one row.
    Needs the `onnx` package (the project venv has it); None without it."""
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = full = 0
    gathered = []
    for init in model.graph.initializer:
        n = 1
        for dim in init.dims:
            n *= dim
        if init.data_type in (onnx.TensorProto.UINT4, onnx.TensorProto.INT4):
            size = (n + 1) // 2
        else:
            size = n * _ONNX_ELEM_BYTES.get(init.data_type, 4)
        full += size
        ops = consumers.get(init.name, set())
        if ops and ops <= {"Gather", "GatherBlockQuantized"} and init.dims:
            total += size // max(init.dims[0], 1)
            gathered.append(init.name)
        else:
            total += size
    return {"bytes": total, "initializer_bytes": full, "gather_only": gathered}


def bandwidth_ceiling(row: dict, arch: dict, bw_gbps: float, gen: int) -> None:
    """Decode ceiling = read bandwidth / (weight bytes + mean KV-cache bytes read per token).

    Weight bytes: for ONNX models, the initializers a decode step reads (see onnx_weight_bytes_per_token);
    for GGUF and safetensors, the file (SmolLM2's embedding is tied to the lm_head, so all of it is read).
    A row that drafts tokens (prompt lookup) reads the weights once per model pass, not per token: its
    `fraction` is passes/s x bytes per pass / bandwidth where the worker counted passes (onnxllm), and
    None where it did not (llama.cpp's lookup)."""
    kv_el = KV_BYTES.get(row["runtime"], 4)
    per_pos = 2 * arch["num_layers"] * arch["num_kv_heads"] * arch["head_dim"] * kv_el
    weights = row["file_mib"] * 2**20
    f = onnx_file_for(row)
    info = onnx_weight_bytes_per_token(f) if f is not None and f.exists() else None
    if info is not None:
        weights = info["bytes"]
        row["weights_read_per_token_mib"] = round(weights / 2**20, 1)
        row["gather_only_initializers"] = info["gather_only"]
    row["ceiling"] = {}
    for r in row["results"]:
        ctx = r["prompt_tokens"] + gen / 2  # mean context length over the decode steps
        per_token = weights + per_pos * ctx
        ceil = bw_gbps * 1e9 / per_token
        row["ceiling"][str(r["prompt_tokens"])] = {
            "bytes_per_token_mib": round(per_token / 2**20, 1), "kv_mib": round(per_pos * ctx / 2**20, 1),
            "ceiling_tok_s": round(ceil, 1),
            "fraction": _fraction(row, r, ceil, gen)}


def _fraction(row: dict, r: dict, ceil: float, gen: int) -> float | None:
    if not r.get("decode_tok_s"):
        return None
    if "decode_passes" in r:
        return round(r["decode_tok_s"] * r["decode_passes"] / max(gen - 1, 1) / ceil, 3)
    return None if row["variant"].endswith(LOOKUP) else round(r["decode_tok_s"] / ceil, 3)


def greedy_agreement(rows: list[dict]) -> None:
    """Share of the first 32 greedy tokens (after the 64-token prompt) equal to onnxllm fp32's: a sanity check."""
    ref = next((r for r in rows if r["runtime"] == "onnxllm" and r["variant"] == "fp32"), None)
    if ref is None:
        return
    ref_toks = ref["results"][0]["tokens"]
    for r in rows:
        toks = r["results"][0]["tokens"]
        n = min(32, len(toks), len(ref_toks))
        same = 0
        for x, y in zip(toks[:n], ref_toks[:n]):
            if x != y:
                break
            same += 1
        r["greedy_prefix_match_vs_onnxllm_fp32"] = f"{same}/{n}"


def _target(name: str, measured: str, ratio: float | None, wanted: float, higher: bool = True) -> dict:
    if ratio is None:
        return {"target": name, "measured": measured, "ratio": None, "wanted": f"{'>=' if higher else '<='} {wanted}",
                "holds": None}
    holds = ratio >= wanted if higher else ratio <= wanted
    short = (1 - ratio / wanted) if higher else (ratio / wanted - 1)
    return {"target": name, "measured": measured, "ratio": round(ratio, 3),
            "wanted": f"{'>=' if higher else '<='} {wanted:.2f}", "holds": holds,
            "short_by": None if holds else round(short, 3)}


def _label(r: dict) -> str:
    from .common import RUNTIME_LABEL

    return f"{RUNTIME_LABEL[r['runtime']].split(' (')[0]} {r['variant']}"


def _at(r: dict, n: int, key: str) -> float | None:
    return next((x[key] for x in r["results"] if x["prompt_tokens"] == n), None)


def issue_targets(rows: list[dict], lengths: list[int], *, default: str, scale: str = "135M",
                  load_limit: float | None = 1.0) -> list[dict]:
    """The targets of issue #18 (point 2) as ratios within this run, for one model scale.

    chat decode: the default variant (drafts on) against the fastest peer, greedy and sampled, >= 1.3x;
    one token per step: the fastest onnxllm /no-draft row against genai int4 and llama.cpp Q4_0, >= 1.1x;
    prefill: the default against the fastest peer at each prompt length, >= 1.5x;
    peak RSS, <= 1.10x: the leanest onnxllm 4-bit row (int4-exact, int4) against llama.cpp Q4_0 / Q4_K_M, and
    the leanest onnxllm 8-bit row (int8-dynamic, int8) against llama.cpp Q8_0 / genai int8;
    load: the default < 1 s (135M only)."""
    from .common import NO_DRAFT

    by = {(r["runtime"], r["variant"]): r for r in rows}
    peers = [r for r in rows if r["runtime"] != "onnxllm"]
    out = []
    d = by.get(("onnxllm", default))
    for mode in ("greedy", "sampled"):
        chat = [p for p in peers if (p.get("chat") or {}).get(mode, {}).get("decode_tok_s")]
        if d is None or not (d.get("chat") or {}).get(mode) or not chat:
            continue
        best = max(chat, key=lambda p: p["chat"][mode]["decode_tok_s"])
        mine, theirs = d["chat"][mode]["decode_tok_s"], best["chat"][mode]["decode_tok_s"]
        out.append(_target(f"{scale} chat decode, {mode}: default >= 1.3x the fastest peer",
                           f"{mine:.0f} vs {_label(best)} {theirs:.0f}", mine / theirs, 1.3))
    steps = [r for r in rows if r["runtime"] == "onnxllm" and r["variant"].endswith(NO_DRAFT)]
    for peer in (("genai", "int4"), ("llamacpp", "Q4_0")):
        p = by.get(peer)
        if p is None or not steps:
            continue
        for n in lengths:
            best = max(steps, key=lambda r: _at(r, n, "decode_tok_s") or 0)
            mine, theirs = _at(best, n, "decode_tok_s"), _at(p, n, "decode_tok_s")
            if mine and theirs:
                out.append(_target(f"{scale} one token per step @{n}: >= 1.1x {_label(p)}",
                                   f"{_label(best)} {mine:.0f} vs {theirs:.0f}", mine / theirs, 1.1))
    for n in lengths:
        cands = [p for p in peers if _at(p, n, "prefill_tok_s")]
        mine = [r for r in rows if r["runtime"] == "onnxllm" and _at(r, n, "prefill_tok_s")]
        # the default variant's row; at scale (no default row) the fastest onnxllm row
        prefill_row = d if d is not None else max(mine, key=lambda r: _at(r, n, "prefill_tok_s"), default=None)
        if prefill_row is None or not cands or not _at(prefill_row, n, "prefill_tok_s"):
            continue
        best = max(cands, key=lambda p: _at(p, n, "prefill_tok_s"))
        mine, theirs = _at(prefill_row, n, "prefill_tok_s"), _at(best, n, "prefill_tok_s")
        out.append(_target(f"{scale} prefill @{n}: {prefill_row['variant']} >= 1.5x the fastest peer",
                           f"{mine:.0f} vs {_label(best)} {theirs:.0f}", mine / theirs, 1.5))
    rss_groups = ((("int4-exact", "int4"), (("llamacpp", "Q4_0"), ("llamacpp", "Q4_K_M")), "4-bit"),
                  (("int8-dynamic", "int8"), (("llamacpp", "Q8_0"), ("genai", "int8")), "8-bit"))
    for mine_base, peer_keys, bits in rss_groups:
        mine = [by[("onnxllm", v)] for b in mine_base for v in (b, b + NO_DRAFT) if ("onnxllm", v) in by]
        theirs = [by[k] for k in peer_keys if k in by]
        if not mine or not theirs:
            continue
        m, t = min(mine, key=lambda r: r["peak_rss_mib"]), min(theirs, key=lambda r: r["peak_rss_mib"])
        out.append(_target(f"{scale} peak RSS at {bits}: within 10% of the leanest peer",
                           f"{_label(m)} {m['peak_rss_mib']:.0f} vs {_label(t)} {t['peak_rss_mib']:.0f} MiB",
                           m["peak_rss_mib"] / t["peak_rss_mib"], 1.10, higher=False))
    if d is not None and load_limit is not None:
        out.append(_target(f"{scale} load: default < {load_limit:.0f} s", f"{d['load_s']:.2f} s",
                           d["load_s"] / load_limit, 1.0, higher=False))
    return out

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

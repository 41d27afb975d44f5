"""What a package holds, for `onnxllm info` and Model.info()."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ..methods import method_dict
from ..package import Manifest, onnx_bytes, safe_path


def _how_read(method: dict) -> str:
    """One line: what a foreign graph's operators and types said (see readers/graph.py)."""
    parts = []
    for op, q in method.get("quantization", {}).items():
        bits = f" {'/'.join(map(str, q['bits']))}-bit" if q.get("bits") else ""
        block = f" block {'/'.join(map(str, q['block_size']))}" if q.get("block_size") else ""
        parts.append(f"{op}{bits}{block} x{q['nodes']}")
    if method.get("float16_weights"):
        parts.append(f"{method['float16_weights']}/{method['weights']} float16 tensors")
    parts.append(f"{method.get('attention')} attention, {method.get('kv_cache')}")
    return f"read from the graph ({method.get('reader')}): " + ", ".join(parts)


def package_info(root: Path, manifest: Manifest, *, providers=None, layout: str = "onnxllm",
                 skipped: dict | None = None) -> dict:
    import onnxruntime as ort

    quality = {}
    qpath = root / "quality.json"
    if qpath.is_file():
        try:
            quality = json.loads(qpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            quality = {"error": "quality.json is not valid JSON"}
    variants = {}
    for name, v in manifest.variants.items():
        variants[name] = {"file": v.file, "scheme": v.scheme, "dtype": v.dtype,
                          "bytes": onnx_bytes(safe_path(root, v.file)), "method": method_dict(v.method),
                          "quality": quality.get(name) if isinstance(quality, dict) else None}
    a = manifest.architecture
    return {
        "package": str(root),
        "architecture": a.model_type,
        "parameters": a.parameters,
        "layers": a.num_layers,
        "hidden_size": a.hidden_size,
        "heads": f"{a.num_heads} query / {a.num_kv_heads} kv, head_dim {a.head_dim}",
        "vocab_size": a.vocab_size,
        "context_length": a.context_length,
        "variants": variants,
        "default_variant": manifest.default_variant,
        "eos_token_ids": manifest.eos_token_ids,
        "bos_token_id": manifest.bos_token_id,
        "chat_template": manifest.chat_template is not None,
        "source": manifest.source,
        "verification": manifest.verification,
        "execution_providers_here": ort.get_available_providers(),
        "device_selected": getattr(providers, "device", None),
        "kind": manifest.kind,
        "layout": layout,  # which reader read the folder
        "skipped": skipped or {},  # files that cannot run, and why
        "embedding": asdict(manifest.embedding) if manifest.embedding else None,
    }


_TEXTS = {"corpus": "the fidelity corpus", "hamlet": "Hamlet", "custom": "a given text"}


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _counts(counts: dict) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in counts.items()) or "none"


def format_info(info: dict) -> str:
    lines = [
        f"package        {info['package']}",
        f"architecture   {info['architecture']}, {info['parameters'] / 1e6:.1f}M parameters, {info['layers']} layers, "
        f"hidden {info['hidden_size']}, heads {info['heads']}",
        f"vocabulary     {info['vocab_size']}",
        f"context        {info['context_length']} tokens",
        f"eos ids        {info['eos_token_ids']}   bos id {info['bos_token_id']}",
        f"chat template  {'yes' if info['chat_template'] else 'no'}",
        f"source         {info['source'].get('kind', '?')}: {info['source'].get('name', '?')}"
        + (f" ({_counts(info['source']['tensor_types'])} tensors)" if info["source"].get("tensor_types") else ""),
        *([f"layout         {info['layout']} (read from its own files; not an onnxllm package)"]
          if info.get("layout", "onnxllm") != "onnxllm" else []),
        "variants:",
    ]
    e = info.get("embedding")
    if e:
        lines.insert(-1, f"embedding      {e['dimension']} dims, {e['pooling']} pooling, "
                         f"{'normalized' if e['normalize'] else 'not normalized'}, up to {e['max_tokens']} tokens")
    for name, v in info["variants"].items():
        defaults = [dev for dev, var in info["default_variant"].items() if var == name]
        how = v["method"].get("operator") or v["method"].get("exporter") or ""
        extra = f" (default on {', '.join(defaults)})" if defaults else ""
        lines.append(f"  {name:<6} {_human(v['bytes']):>10}  {v['file']}  {how}{extra}")
        gguf = v["method"].get("gguf") or {}
        if gguf.get("used"):
            how = (
                "exactly, every weight" if v["method"].get("lossless") else f"{gguf.get('requantized', 0)} re-quantized"
            )
            kept = f", {gguf['kept_float']} kept float" if gguf.get("kept_float") else ""
            lines.append(f"         GGUF blocks imported {how}: {_counts(gguf.get('types', {}))}{kept}")
        if v["method"].get("read_from") == "graph":
            lines.append(f"         {v['scheme']}, {v['dtype']} KV: {_how_read(v['method'])}")
        q = v.get("quality")
        if isinstance(q, dict) and "perplexity" in q:
            parts = [f"perplexity {q['perplexity']:.3f}"]
            if q.get("top1_agreement") is not None:
                parts.append(f"top-1 vs {q.get('reference', 'fp32')} {100 * q['top1_agreement']:.1f}%")
            if q.get("kl_divergence") is not None:
                parts.append(f"KL {q['kl_divergence']:.4f}")
            if q.get("greedy_tokens"):
                parts.append(f"greedy {q.get('greedy_agreement')}/{q['greedy_tokens']}")
            if q.get("tokens"):
                parts.append(f"on {q['tokens']} tokens of {_TEXTS.get(q.get('text'), 'a given text')}")
            lines.append("         " + ", ".join(parts))
            for route, p in (q.get("paths") or {}).items():  # the fidelity corpus's routes (quantize/fidelity.py)
                sampled = p.get("tokens") and p["tokens"] < q.get("tokens", 0)
                sample = f" (a {p['tokens']}-token sample)" if sampled else ""
                lines.append(f"         {route:<8} top-1 {100 * p['top1_agreement']:.1f}%, KL {p['kl_divergence']:.4f}"
                             + sample)
        if v["method"].get("min_cosine_to_fp32") is not None:
            lines.append(f"         cosine to fp32: min {v['method']['min_cosine_to_fp32']:.4f}, "
                         f"mean {v['method']['mean_cosine_to_fp32']:.4f}")
    for file, why in info.get("skipped", {}).items():
        lines.append(f"  skipped {file}: {why}")
    lines.append(f"providers here {', '.join(info['execution_providers_here'])}")
    return "\n".join(lines)

"""One layer's attention as ONNX: always ONNX Runtime's GroupQueryAttention (so past and present can share the
runtime's preallocated buffer), with what it cannot do on every execution provider done around it.

    qkv ─┬─────────────────────────────────────────────── GroupQueryAttention(packed, fused rotary) ─ out
         │ (q/k norm or rotary outside)                       ▲ softcap, local_window_size, scale
         └─ Split ─ q ─ [Reshape ─ RMSNorm ─ Reshape] ─ [RoPE ops] ─┤
                    k ─ [Reshape ─ RMSNorm ─ Reshape] ─ [RoPE ops] ─┤
                    v ──────────────────────────────────────────────┘

- q/k norm: SimplifiedLayerNormalization per head (Qwen3, Gemma 3) or over all heads (OLMo 2); the
  operator's own q_norm_weight input is honored by CUDA and WebGPU only.
- RoPE inside the operator when its rotary dimension / 2 is a multiple of 8 (onnxruntime 1.32's rule),
  else explicit ops (Gather cos/sin by position, rotate half) before it and do_rotary=0.
- LongRoPE: the cos/sin table holds the short rows then the long rows; the positions that index it are
  shifted by the context length when the highest position fed is past the switch.
- No RoPE in a layer (SmolLM3): do_rotary=0. A window: local_window_size. Soft-capping: softcap.
"""

from __future__ import annotations

import numpy as np

from .architectures import DecoderDims, LayerWeights, materialize
from .graph_ops import MS_DOMAIN, Graph, rms_norm
from .rope import RopeTable


class RopeInputs:
    """The cos/sin initializers of each RoPE table and the positions that index them, made once per graph."""

    def __init__(self, g: Graph, tables: list[RopeTable], dims: DecoderDims, position_ids: str):
        self.g, self.tables, self.dims = g, tables, dims
        self.caches: list[tuple[str, str]] = []
        self._positions: dict[int, str] = {}
        self.position_ids = position_ids
        for i, table in enumerate(tables):
            rows = np.arange(dims.context_length, dtype=np.float32)
            freqs = [np.outer(rows, table.inv_freq.astype(np.float32))]  # (T, rotary_dim / 2)
            if table.long_inv_freq is not None:
                freqs.append(np.outer(rows, table.long_inv_freq.astype(np.float32)))
            f = np.concatenate(freqs)  # LongRoPE: (2T, rotary_dim / 2), short rows first
            name = "model.rotary" if len(tables) == 1 else f"model.rotary.{i}"
            self.caches.append((g.weight(f"{name}.cos_cache", np.cos(f) * table.scaling),
                                g.weight(f"{name}.sin_cache", np.sin(f) * table.scaling)))

    def positions(self, index: int) -> str | None:
        """Rows of table `index` for the fed positions (1, S), int64; None when GroupQueryAttention's own
        positions (past length + i) are right, i.e. for one-set tables."""
        table = self.tables[index]
        if table.long_inv_freq is None:
            return None
        if index not in self._positions:
            g, p = self.g, f"/model/rotary.{index}/longrope"
            # transformers: long factors when max(position_ids) + 1 > original_max_position_embeddings.
            top = g.op("ReduceMax", [self.position_ids], f"{p}/ReduceMax", keepdims=0)
            over = g.op("Greater", [top, g.const(f"{p}/switch", table.switch - 1, np.int64)], f"{p}/Greater")
            shift = g.op("Mul", [g.op("Cast", [over], f"{p}/Cast", to=7),
                                 g.const(f"{p}/rows", self.dims.context_length, np.int64)], f"{p}/Mul")
            self._positions[index] = g.op("Add", [self.position_ids, shift], f"{p}/Add")
        return self._positions[index]


def _rotate(g: Graph, x: str, heads: int, dims: DecoderDims, rope: RopeInputs, index: int, name: str) -> str:
    """x (B, S, heads * D) with RoPE on the first rotary_dim of each head, rotate-half style, by explicit ops."""
    d, r = dims.head_dim, rope.tables[index].rotary_dim
    cos, sin = rope.caches[index]
    pos = rope.positions(index) or rope.position_ids
    axis3 = g.const(f"{name}/axis3", [3], np.int64)
    c = g.op("Unsqueeze", [g.op("Gather", [cos, pos], f"{name}/cos/Gather"), g.const(f"{name}/axis2", [2], np.int64)],
             f"{name}/cos/Unsqueeze")  # (B, S, 1, r / 2)
    s = g.op("Unsqueeze", [g.op("Gather", [sin, pos], f"{name}/sin/Gather"), g.const(f"{name}/axis2s", [2], np.int64)],
             f"{name}/sin/Unsqueeze")
    x4 = g.op("Reshape", [x, g.const(f"{name}/heads_shape", [0, 0, heads, d], np.int64)], f"{name}/Reshape")

    def part(lo: int, hi: int, tag: str) -> str:
        return g.op("Slice", [x4, g.const(f"{name}/{tag}/lo", [lo], np.int64),
                              g.const(f"{name}/{tag}/hi", [hi], np.int64), axis3], f"{name}/{tag}/Slice")

    x1, x2 = part(0, r // 2, "x1"), part(r // 2, r, "x2")  # (B, S, heads, r / 2) each
    first = g.op("Sub", [g.op("Mul", [x1, c], f"{name}/x1c"), g.op("Mul", [x2, s], f"{name}/x2s")], f"{name}/Sub")
    second = g.op("Add", [g.op("Mul", [x2, c], f"{name}/x2c"), g.op("Mul", [x1, s], f"{name}/x1s")], f"{name}/Add")
    pieces = [first, second] + ([part(r, d, "pass")] if r < d else [])
    rotated = g.op("Concat", pieces, f"{name}/Concat", axis=3)
    return g.op("Reshape", [rotated, g.const(f"{name}/flat_shape", [0, 0, heads * d], np.int64)], f"{name}/Flatten")


def _qk_norm(g: Graph, x: str, layer_norm, heads: int, dims: DecoderDims, name: str) -> str:
    if materialize(layer_norm.weight).shape[0] != dims.head_dim:  # over all heads at once (OLMo 2)
        return rms_norm(g, x, layer_norm, dims.norm_eps, name)
    x4 = g.op("Reshape", [x, g.const(f"{name}/heads_shape", [0, 0, heads, dims.head_dim], np.int64)], f"{name}/Reshape")
    normed = rms_norm(g, x4, layer_norm, dims.norm_eps, name)
    return g.op("Reshape", [normed, g.const(f"{name}/flat_shape", [0, 0, heads * dims.head_dim], np.int64)],
                f"{name}/Flatten")


def attention(g: Graph, qkv: str, layer: LayerWeights, dims: DecoderDims, rope: RopeInputs | None, *,
              past: tuple[str, str], present: tuple[str, str], seqlens_k: str, total_len: str, name: str) -> str:
    """The attention output (B, S, heads * head_dim) of one layer; writes present key/value."""
    spec = layer.attention
    table = rope.tables[spec.rope] if rope is not None and spec.rope >= 0 else None
    fused = table is not None and table.fusable(dims.head_dim)
    outside = table is not None and not fused
    q, k, v = qkv, "", ""
    if layer.q_norm is not None or outside:
        h, kv, d = dims.num_heads, dims.num_kv_heads, dims.head_dim
        q, k, v = g.op("Split", [qkv, g.const(f"{name}/qkv_split", [h * d, kv * d, kv * d], np.int64)],
                       f"{name}/qkv_Split", outputs=3, axis=-1)
        if layer.q_norm is not None:
            q = _qk_norm(g, q, layer.q_norm, h, dims, f"{name}/q_norm")
            k = _qk_norm(g, k, layer.k_norm, kv, dims, f"{name}/k_norm")
        if outside:
            q = _rotate(g, q, h, dims, rope, spec.rope, f"{name}/q_rotary")
            k = _rotate(g, k, kv, dims, rope, spec.rope, f"{name}/k_rotary")
    cos, sin = rope.caches[spec.rope] if fused else ("", "")
    positions = rope.positions(spec.rope) if fused else None
    inputs = [q, k, v, past[0], past[1], seqlens_k, total_len, cos, sin] + ([positions] if positions else [])
    node = f"{name}/GroupQueryAttention"
    out, _, _ = g.op(
        "GroupQueryAttention", inputs, node, outputs=[f"{node}/output_0", present[0], present[1]], domain=MS_DOMAIN,
        num_heads=dims.num_heads, kv_num_heads=dims.num_kv_heads, scale=spec.scale, softcap=spec.softcap,
        do_rotary=int(fused), rotary_interleaved=0, local_window_size=spec.window,
    )
    return out

"""Emit the ONNX decoder graph from `DecoderWeights`.

One graph serves prefill and decode (an empty past on the first call). Attention is ONNX Runtime's
GroupQueryAttention with fused rotary embedding; it runs on CPU, CUDA and DirectML, and takes its
past and present KV either as separate growing tensors or as one shared preallocated buffer.

    input_ids ─ Gather(embed) ─┬─ [× embed_scale] ─ (+ Gather(pos_embed, position_ids))
                               │
    per layer:  residual ─ SkipNorm ─ MatMul(qkv) ─ GroupQueryAttention ─ MatMul(o) ─┐
                   ▲                                   ▲     │ present.i.key/value     │
                   │               past_key_values.i.* ┘     ▼                         │
                   └── SkipNorm ─ MatMul(up) ─ act ─ MatMul(down) ◄────────────────────┘
    final:      SkipNorm ─ Gemm(lm_head, transB) ─ logits
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..package import IOSpec
from .architectures import DecoderWeights, Linear, Norm

OPSET = 21
MS_DOMAIN = "com.microsoft"
_DTYPES = {"float32": (TensorProto.FLOAT, np.float32), "float16": (TensorProto.FLOAT16, np.float16)}


# The naming onnxruntime-genai, optimum and transformers.js share, plus our optional
# num_logits_to_keep input (logits for the last N positions only; 0, the default, keeps all).
IO_NAMES = IOSpec(logits_to_keep="num_logits_to_keep")


class _Graph:
    """Accumulates nodes and initializers under readable, path-like names."""

    def __init__(self, dtype: str):
        self.elem, self.np_dtype = _DTYPES[dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def weight(self, name: str, array: np.ndarray, *, dtype=None) -> str:
        array = np.ascontiguousarray(array, dtype=dtype or self.np_dtype)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def const(self, name: str, values, dtype) -> str:
        return self.weight(name, np.asarray(values, dtype=dtype), dtype=dtype)

    def op(self, op_type: str, inputs: list[str], name: str, *, outputs: int | list[str] = 1, domain: str = "", **attrs):
        out_names = outputs if isinstance(outputs, list) else [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, out_names, name=name, domain=domain, **attrs))
        return out_names[0] if len(out_names) == 1 else out_names


def _linear(g: _Graph, x: str, lin: Linear, name: str) -> str:
    """x @ W^T (+ b); MatMul with a (in, out) initializer, which the quantizers rewrite."""
    y = g.op("MatMul", [x, g.weight(f"{name}.weight", lin.weight.T)], f"{name}/MatMul")
    if lin.bias is not None:
        y = g.op("Add", [y, g.weight(f"{name}.bias", lin.bias)], f"{name}/Add")
    return y


def _skip_norm(g: _Graph, residual: str | None, delta: str, norm: Norm, kind: str, eps: float, name: str):
    """(normed, new_residual): residual + delta, then RMS or Layer norm, in one fused node."""
    gamma = g.weight(f"{name}.weight", norm.weight)
    beta = [g.weight(f"{name}.bias", norm.bias)] if norm.bias is not None else []
    if residual is None:
        op = "SimplifiedLayerNormalization" if kind == "rms" else "LayerNormalization"
        normed = g.op(op, [delta, gamma, *beta], f"{name}/{op}", axis=-1, epsilon=eps, stash_type=1)
        return normed, delta
    op = "SkipSimplifiedLayerNormalization" if kind == "rms" else "SkipLayerNormalization"
    # Outputs 1 and 2 (mean, inverse std) are left unnamed, so the kernel neither computes nor stores them.
    node = f"{name}/{op}"
    outs = g.op(op, [residual, delta, gamma, *beta], node, outputs=[f"{node}/output_0", "", "", f"{node}/output_3"],
                domain=MS_DOMAIN, epsilon=eps)
    return outs[0], outs[3]


def _activation(g: _Graph, x: str, kind: str, name: str) -> str:
    if kind == "silu":
        return g.op("Mul", [x, g.op("Sigmoid", [x], f"{name}/Sigmoid")], f"{name}/Mul")
    return g.op("Gelu", [x], f"{name}/Gelu", approximate="tanh" if kind == "gelu_tanh" else "none")


def _rotary_caches(g: _Graph, w: DecoderWeights) -> tuple[str, str]:
    """cos/sin tables (context, rotary_dim / 2) that GroupQueryAttention indexes by position."""
    positions = np.arange(w.dims.context_length, dtype=np.float32)
    freqs = np.outer(positions, w.inv_freq.astype(np.float32))  # (T, rotary_dim / 2)
    cos = g.weight("model.rotary.cos_cache", np.cos(freqs) * w.rope_scaling)
    sin = g.weight("model.rotary.sin_cache", np.sin(freqs) * w.rope_scaling)
    return cos, sin


def build_decoder(w: DecoderWeights, *, dtype: str = "float32", io: IOSpec = IO_NAMES) -> onnx.ModelProto:
    """The whole decoder as an in-memory ModelProto (weights inline; `save_model` externalizes)."""
    d = w.dims
    g = _Graph(dtype)
    kv_shape = ["batch_size", d.num_kv_heads, "past_sequence_length", d.head_dim]
    inputs = [
        helper.make_tensor_value_info(io.input_ids, TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info(io.attention_mask, TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info(io.position_ids, TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info(io.logits, TensorProto.FLOAT, ["batch_size", "sequence_length", d.vocab_size])]
    present_shape = ["batch_size", d.num_kv_heads, "total_sequence_length", d.head_dim]
    for i in range(d.num_layers):
        inputs += [helper.make_tensor_value_info(io.past_key.format(i), g.elem, kv_shape),
                   helper.make_tensor_value_info(io.past_value.format(i), g.elem, kv_shape)]
        outputs += [helper.make_tensor_value_info(io.present_key.format(i), g.elem, present_shape),
                    helper.make_tensor_value_info(io.present_value.format(i), g.elem, present_shape)]

    # GroupQueryAttention reads lengths, not masks: seqlens_k = tokens seen - 1, total = mask width.
    mask_sum = g.op("ReduceSum", [io.attention_mask, g.const("/model/one_axis", [1], np.int64)],
                    "/model/attn_mask/ReduceSum", keepdims=0)
    seqlens = g.op("Sub", [mask_sum, g.const("/model/one_i64", 1, np.int64)], "/model/attn_mask/Sub")
    seqlens_k = g.op("Cast", [seqlens], "/model/attn_mask/seqlens_k", to=TensorProto.INT32)
    mask_shape = g.op("Shape", [io.attention_mask], "/model/attn_mask/Shape")
    total = g.op("Gather", [mask_shape, g.const("/model/one_index", 1, np.int64)], "/model/attn_mask/Gather", axis=0)
    total_len = g.op("Cast", [total], "/model/attn_mask/total_seq_len", to=TensorProto.INT32)

    h = g.op("Gather", [g.weight("model.embed_tokens.weight", w.embed), io.input_ids], "/model/embed_tokens/Gather")
    if d.embed_scale != 1.0:
        h = g.op("Mul", [h, g.const("model.embed_scale", d.embed_scale, g.np_dtype)], "/model/embed_tokens/Scale")
    if w.pos_embed is not None:
        pos = g.op("Gather", [g.weight("model.embed_positions.weight", w.pos_embed), io.position_ids],
                   "/model/embed_positions/Gather")
        h = g.op("Add", [h, pos], "/model/embed_positions/Add")
    cos, sin = _rotary_caches(g, w) if w.inv_freq is not None else ("", "")

    residual, delta = None, h
    for i, layer in enumerate(w.layers):
        p = f"/model/layers.{i}"
        x, residual = _skip_norm(g, residual, delta, layer.attn_norm, d.norm, d.norm_eps, f"{p}/input_layernorm")
        qkv = _linear(g, x, layer.qkv, f"{p}/attn/qkv_proj")
        attn, _, _ = g.op(
            "GroupQueryAttention",
            [qkv, "", "", io.past_key.format(i), io.past_value.format(i), seqlens_k, total_len, cos, sin],
            f"{p}/attn/GroupQueryAttention",
            outputs=[f"{p}/attn/GroupQueryAttention/output_0", io.present_key.format(i), io.present_value.format(i)],
            domain=MS_DOMAIN,
            num_heads=d.num_heads,
            kv_num_heads=d.num_kv_heads,
            scale=d.attn_scale,
            do_rotary=int(w.inv_freq is not None),
            rotary_interleaved=0,
            local_window_size=d.sliding_window,
        )
        delta = _linear(g, attn, layer.o, f"{p}/attn/o_proj")
        x, residual = _skip_norm(g, residual, delta, layer.mlp_norm, d.norm, d.norm_eps, f"{p}/post_attention_layernorm")
        up = _linear(g, x, layer.up, f"{p}/mlp/up_proj")
        if d.gated_mlp:
            gate, up = g.op("Split", [up], f"{p}/mlp/Split", outputs=2, axis=-1, num_outputs=2)
            up = g.op("Mul", [_activation(g, gate, d.activation, f"{p}/mlp/act"), up], f"{p}/mlp/Mul")
        else:
            up = _activation(g, up, d.activation, f"{p}/mlp/act")
        delta = _linear(g, up, layer.down, f"{p}/mlp/down_proj")
    x, _ = _skip_norm(g, residual, delta, w.final_norm, d.norm, d.norm_eps, "/model/norm")

    # Prefill needs logits of the last position only: slice hidden states to the last
    # `num_logits_to_keep` positions (0 keeps all). It is an input with a default initializer,
    # so runtimes that do not know it (onnxruntime-genai, optimum) get every position as usual.
    keep = io.logits_to_keep
    g.initializers.append(numpy_helper.from_array(np.array(0, dtype=np.int64), keep))
    inputs.append(helper.make_tensor_value_info(keep, TensorProto.INT64, []))
    start = g.op("Neg", [keep], "/lm_head/keep/Neg")
    start = g.op("Unsqueeze", [start, g.const("/lm_head/keep/axis0", [0], np.int64)], "/lm_head/keep/Unsqueeze")
    x = g.op("Slice", [x, start, g.const("/lm_head/keep/end", [np.iinfo(np.int64).max], np.int64),
                       g.const("/lm_head/keep/axis", [1], np.int64)], "/lm_head/keep/Slice")

    # lm_head as Gemm(transB) over (vocab, hidden): a tied model shares the embedding, no copy.
    flat = g.op("Reshape", [x, g.const("/lm_head/flat_shape", [-1, d.hidden_size], np.int64)], "/lm_head/Reshape")
    head = "model.embed_tokens.weight" if w.lm_head is w.embed else g.weight("lm_head.weight", w.lm_head)
    logits = g.op("Gemm", [flat, head], "/lm_head/Gemm", transB=1)
    if dtype != "float32":
        logits = g.op("Cast", [logits], "/lm_head/Cast", to=TensorProto.FLOAT)
    lead = g.op("Slice", [g.op("Shape", [x], "/lm_head/Shape"), g.const("/lm_head/zero", [0], np.int64),
                          g.const("/lm_head/two", [2], np.int64)], "/lm_head/Slice")
    out_shape = g.op("Concat", [lead, g.const("/lm_head/vocab", [d.vocab_size], np.int64)], "/lm_head/Concat", axis=0)
    g.op("Reshape", [logits, out_shape], "/lm_head/Reshape_out", outputs=[io.logits])

    graph = helper.make_graph(g.nodes, "onnxllm_decoder", inputs, outputs, g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="onnxllm",
    )
    model.ir_version = 10
    return model

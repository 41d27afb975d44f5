"""Emit the ONNX decoder graph from `DecoderWeights`.

One graph serves prefill and decode (an empty past on the first call). Attention is ONNX Runtime's
GroupQueryAttention (attention.py); it runs on CPU, CUDA and DirectML, and takes its past and present KV
either as separate growing tensors or as one shared preallocated buffer. Every norm, multiplier and
soft-cap below is a field of the weights; absent fields emit nothing.

    input_ids ─ Gather(embed) ─┬─ [× embed_scale] ─ (+ Gather(pos_embed, position_ids))
                               │
    per layer:  residual ─ SkipNorm ─ MatMul(qkv) ─ attention ─ MatMul(o) ─ [norm] ─ [× residual_scale] ─┐
                   ▲                                   ▲   │ present.i.key/value                           │
                   │               past_key_values.i.* ┘   ▼                                               │
                   └── SkipNorm ─ MatMul(up) ─ act ─ MatMul(down) ─ [norm] ─ [× residual_scale] ◄───────────┘
    final:      SkipNorm ─ Gemm(lm_head, transB) ─ [× logits_scale] ─ [soft-cap] ─ logits
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..package import IOSpec
from .architectures import DecoderWeights
from .attention import RopeInputs, attention
from .graph_ops import MS_DOMAIN, Graph, activation, add_norm, linear, rms_norm, softcap

OPSET = 21

# The naming onnxruntime-genai, optimum and transformers.js share, plus our optional
# num_logits_to_keep input (logits for the last N positions only; 0, the default, keeps all).
IO_NAMES = IOSpec(logits_to_keep="num_logits_to_keep")


def _block_output(g: Graph, x: str, norm, w: DecoderWeights, name: str) -> str:
    """What a block adds to the residual: its output, normalized (Gemma 2/3, OLMo 2) and scaled (granite)."""
    d = w.dims
    if norm is not None:
        x = rms_norm(g, x, norm, d.norm_eps, f"{name}_norm")
    if d.residual_scale != 1.0:
        x = g.op("Mul", [x, g.const(f"{name}_scale", d.residual_scale, g.np_dtype)], f"{name}_scale/Mul")
    return x


def build_decoder(w: DecoderWeights, *, dtype: str = "float32", io: IOSpec = IO_NAMES,
                  data: BinaryIO | None = None, location: str = "") -> onnx.ModelProto:
    """The whole decoder as a ModelProto. Weights inline, or, with `data` (an open file that will sit beside the
    .onnx as `location`), written there one by one as they are made: the proto then holds references only."""
    d = w.dims
    g = Graph(dtype, data=data, location=location)
    kv_shape = ["batch_size", d.num_kv_heads, "past_sequence_length", d.head_dim]
    inputs = [
        helper.make_tensor_value_info(io.input_ids, TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info(io.attention_mask, TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info(io.position_ids, TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info(io.logits, TensorProto.FLOAT,
                                             ["batch_size", "sequence_length", d.vocab_size])]
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
    rope = RopeInputs(g, w.rope, d, io.position_ids) if w.rope else None

    residual, delta = None, h
    for i, layer in enumerate(w.layers):
        p = f"/model/layers.{i}"
        x, residual = add_norm(g, residual, delta, layer.attn_norm, d.norm, d.norm_eps, f"{p}/input_layernorm")
        qkv = linear(g, x, layer.qkv, f"{p}/attn/qkv_proj")
        attn = attention(g, qkv, layer, d, rope, past=(io.past_key.format(i), io.past_value.format(i)),
                         present=(io.present_key.format(i), io.present_value.format(i)), seqlens_k=seqlens_k,
                         total_len=total_len, name=f"{p}/attn")
        delta = _block_output(g, linear(g, attn, layer.o, f"{p}/attn/o_proj"), layer.attn_out_norm, w,
                              f"{p}/attn/output")
        x, residual = add_norm(g, residual, delta, layer.mlp_norm, d.norm, d.norm_eps, f"{p}/post_attention_layernorm")
        up = linear(g, x, layer.up, f"{p}/mlp/up_proj")
        if d.gated_mlp:
            gate, up = g.op("Split", [up], f"{p}/mlp/Split", outputs=2, axis=-1, num_outputs=2)
            up = g.op("Mul", [activation(g, gate, d.activation, f"{p}/mlp/act"), up], f"{p}/mlp/Mul")
        else:
            up = activation(g, up, d.activation, f"{p}/mlp/act")
        delta = _block_output(g, linear(g, up, layer.down, f"{p}/mlp/down_proj"), layer.mlp_out_norm, w,
                              f"{p}/mlp/output")
    x, _ = add_norm(g, residual, delta, w.final_norm, d.norm, d.norm_eps, "/model/norm")

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
    if d.logits_scale != 1.0:  # granite divides by logits_scaling
        logits = g.op("Mul", [logits, g.const("/lm_head/logits_scale", d.logits_scale, np.float32)], "/lm_head/Scale")
    if d.final_softcap:
        logits = softcap(g, logits, d.final_softcap, np.float32, "/lm_head/softcap")
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

"""What a decoder .onnx says about itself: I/O names and roles, KV layout and dtype, how it is quantized.

Read from the graph's own inputs, outputs, operators and initializer types (never from the file name);
weights are not loaded (external data is only checked to exist). A graph onnxllm cannot feed is refused
here with a one-line error that names what was found.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidPackageError
from ..package import IOSpec, KVCacheSpec, safe_path

_PAST = [re.compile(r"^(past_key_values)\.(\d+)\.(key|value)$"), re.compile(r"^(past)\.(\d+)\.(key|value)$")]
_PRESENT = [re.compile(r"^(present)\.(\d+)\.(key|value)$"), re.compile(r"^(present_key_values)\.(\d+)\.(key|value)$")]
_KEEP = ("num_logits_to_keep", "logits_to_keep")
_FLOAT_TYPES = {1: "float32", 10: "float16"}  # onnx.TensorProto.FLOAT / FLOAT16
_ATTENTION_OPS = ("GroupQueryAttention", "MultiHeadAttention", "Attention", "PagedAttention")


@dataclass(frozen=True)
class GraphFacts:
    """One decoder graph, read from the file."""

    file: str  # relative to the folder
    io: IOSpec
    kv: KVCacheSpec
    num_layers: int
    num_kv_heads: int | None  # None: symbolic in the graph (the folder's config says)
    head_dim: int | None
    vocab_size: int | None
    scheme: str  # fp32 | fp16 | int8 | int4
    quantization: dict = field(default_factory=dict)  # operator -> {"nodes": n, "bits": [...], "block_size": [...]}
    float16_weights: int = 0
    weights: int = 0
    parameters: int = 0
    attention: str = "concatenating"  # or the fused operator's name

    def method(self, reader: str) -> dict:
        """The variant's `method` record: how onnxllm read it."""
        return {"reader": reader, "read_from": "graph", "attention": self.attention,
                "kv_cache": "shared buffer" if self.kv.shared_buffer else "concatenated past",
                "quantization": self.quantization, "float16_weights": self.float16_weights, "weights": self.weights}


def _dims(value_info) -> list:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]


def _match(patterns, names) -> tuple[str | None, dict[int, set[str]]]:
    """The name pattern ("past_key_values.{}.key" style prefix) and {layer: {"key", "value"}} it covers."""
    for pattern in patterns:
        layers: dict[int, set[str]] = {}
        prefix = None
        for name in names:
            m = pattern.match(name)
            if m:
                prefix = m.group(1)
                layers.setdefault(int(m.group(2)), set()).add(m.group(3))
        if layers:
            return prefix, layers
    return None, {}


def _check_external_data(model, rel: str, root: Path) -> None:
    missing = set()
    for tensor in model.graph.initializer:
        if tensor.data_location != 1:  # onnx.TensorProto.EXTERNAL
            continue
        where = {e.key: e.value for e in tensor.external_data}
        location = where.get("location", "")
        relative = os.path.normpath(os.path.join(os.path.dirname(rel), location)) if location else ""
        try:
            target = safe_path(root, relative)
        except InvalidPackageError:
            raise InvalidPackageError(f"{rel} names external data {location!r} outside its folder; refused") from None
        end = int(where.get("offset", 0)) + int(where.get("length", 0))
        if not target.is_file() or target.stat().st_size < end:
            missing.add(location)
    if missing:
        raise InvalidPackageError(f"{rel} keeps its weights in {', '.join(sorted(missing))}, which is missing or "
                                  "truncated; copy the complete file beside it")


def _quantization(model) -> tuple[str, dict, int, int, int]:
    """(scheme, per-operator record, float16 initializers, initializers, parameters) from operators and types."""
    ops = Counter(n.op_type for n in model.graph.node)
    record: dict = {}
    params = 0
    for node in model.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized", "MatMulBnb4"):
            attrs = {a.name: a.i for a in node.attribute}
            entry = record.setdefault(node.op_type, {"nodes": 0, "bits": set(), "block_size": set()})
            entry["nodes"] += 1
            entry["bits"].add(attrs.get("bits", 4))
            entry["block_size"].add(attrs.get("block_size", 0))
            params += attrs.get("K", 0) * attrs.get("N", 0)
    for op in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul",
               "QLinearMatMul"):
        if ops.get(op):
            record[op] = {"nodes": ops[op]}
    for entry in record.values():
        for key in ("bits", "block_size"):
            if key in entry:
                entry[key] = sorted(entry[key])
    float16 = sum(1 for t in model.graph.initializer if t.data_type == 10)
    total = len(model.graph.initializer)
    for t in model.graph.initializer:
        if t.data_type in (1, 10, 16) and len(t.dims) >= 2:
            n = 1
            for d in t.dims:
                n *= d
            params += n
    bits = set(record.get("MatMulNBits", {}).get("bits", [])) | ({4} if "MatMulBnb4" in record else set())
    if 4 in bits or 2 in bits or 3 in bits:
        scheme = "int4"
    elif bits or any(
        op in record
        for op in ("MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "QuantizeLinear", "DynamicQuantizeLinear")
    ):
        scheme = "int8"
    else:
        scheme = "fp16" if float16 * 2 > total else "fp32"
    return scheme, record, float16, total, params


def inspect_graph(path: Path, root: Path) -> GraphFacts:
    """Read one decoder graph; InvalidPackageError (one line) when it is not one onnxllm can feed."""
    import onnx

    rel = str(path.resolve().relative_to(root.resolve()))
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors share no base
        raise InvalidPackageError(f"{rel} is not a readable ONNX file ({type(exc).__name__}); re-download it") from None
    _check_external_data(model, rel, root)
    inits = {t.name for t in model.graph.initializer}
    inputs = {i.name: i for i in model.graph.input if i.name not in inits}
    outputs = {o.name: o for o in model.graph.output}
    if "logits" not in outputs:
        raise InvalidPackageError(f"{rel} is not a causal LM decoder: it has no 'logits' output (outputs: "
                                  f"{', '.join(list(outputs)[:5])}); onnxllm runs text decoders")
    if "input_ids" not in inputs:
        raise InvalidPackageError(f"{rel} takes no input_ids (inputs: {', '.join(list(inputs)[:5])}); an embedding "
                                  "or vision graph is not a text decoder onnxllm can run")
    past_prefix, past = _match(_PAST, inputs)
    present_prefix, present = _match(_PRESENT, outputs)
    if not past or not present:
        raise InvalidPackageError(f"{rel} takes no past key/values (a decoder without a KV cache, or a fused past "
                                  "tensor); use the folder's with-past or merged decoder file")
    layers = sorted(past)
    if (
        layers != list(range(len(layers)))
        or any(v != {"key", "value"} for v in past.values())
        or set(present) != set(past)
    ):
        raise InvalidPackageError(f"{rel} has past/present key/values for layers {layers[:8]} that do not pair up")
    roles = {"input_ids", "attention_mask", "position_ids", "use_cache_branch", *_KEEP}
    roles |= {n for n in inputs if _match(_PAST, [n])[1]}
    unknown = [n for n in inputs if n not in roles]
    if unknown or "attention_mask" not in inputs:
        need = unknown or ["attention_mask (missing)"]
        raise InvalidPackageError(f"{rel} needs inputs onnxllm cannot feed: {', '.join(need[:5])}")
    first = inputs[f"{past_prefix}.0.key"]
    elem = first.type.tensor_type.elem_type
    if elem not in _FLOAT_TYPES:
        raise InvalidPackageError(f"{rel} keeps its KV cache in ONNX type {elem}; onnxllm feeds float32 or float16")
    dims = _dims(first)
    if len(dims) != 4:
        raise InvalidPackageError(
            f"{rel}: past key/values have {len(dims)} axes; onnxllm feeds (batch, heads, seq, dim)"
        )
    vocab = _dims(outputs["logits"])[-1:] or [None]
    ops = {n.op_type for n in model.graph.node}
    attention = next((op for op in _ATTENTION_OPS if op in ops), "concatenating")
    scheme, record, float16, total, params = _quantization(model)
    io = IOSpec(input_ids="input_ids", attention_mask="attention_mask",
                position_ids="position_ids" if "position_ids" in inputs else None,
                past_key=f"{past_prefix}.{{}}.key", past_value=f"{past_prefix}.{{}}.value", logits="logits",
                present_key=f"{present_prefix}.{{}}.key", present_value=f"{present_prefix}.{{}}.value",
                logits_to_keep=next((k for k in _KEEP if k in inputs), None),
                use_cache_branch="use_cache_branch" if "use_cache_branch" in inputs else None)
    # GroupQueryAttention finds a shared past/present buffer by itself (same pointer); anything else concatenates.
    kv = KVCacheSpec(dtype=_FLOAT_TYPES[elem], shared_buffer=attention == "GroupQueryAttention")
    return GraphFacts(file=rel, io=io, kv=kv, num_layers=len(layers),
                      num_kv_heads=dims[1] if isinstance(dims[1], int) else None,
                      head_dim=dims[3] if isinstance(dims[3], int) else None,
                      vocab_size=vocab[0] if isinstance(vocab[0], int) else None, scheme=scheme,
                      quantization=record, float16_weights=float16, weights=total, parameters=params,
                      attention=attention)

"""The small ONNX-building vocabulary graph.py and attention.py share: a node/initializer accumulator with
readable, path-like names (`/model/layers.0/attn/qkv_proj/MatMul`, what quantizer exclusions target) and the
few composite ops both emit."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from typing import BinaryIO

from .architectures import Linear, Norm, Tensor, materialize

MS_DOMAIN = "com.microsoft"
_DTYPES = {"float32": (TensorProto.FLOAT, np.float32), "float16": (TensorProto.FLOAT16, np.float16)}


class Graph:
    """Accumulates nodes and initializers under readable names.

    With `data` (an open file) every weight of 1 KiB or more is written there as soon as it is made and the
    graph keeps only a reference (ONNX external data, `location` relative to the .onnx file): an export then
    holds one tensor at a time, not a second copy of the model. Without it weights stay inline."""

    def __init__(self, dtype: str, *, data: BinaryIO | None = None, location: str = ""):
        self.elem, self.np_dtype = _DTYPES[dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._data, self._location = data, location

    def weight(self, name: str, array: Tensor, *, dtype=None, transpose: bool = False) -> str:
        array = materialize(array)
        array = np.ascontiguousarray(array.T if transpose else array, dtype=dtype or self.np_dtype)
        if self._data is None or array.nbytes < 1024:  # small constants inline: shape inference reads them
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        offset = self._data.tell()
        pad = -offset % 64  # 64-byte aligned, so a reader that maps the file can use each tensor in place
        if pad:
            self._data.write(b"\0" * pad)
            offset += pad
        self._data.write(array.data)
        tensor = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                                  dims=array.shape, data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", self._location), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        return name

    def const(self, name: str, values, dtype) -> str:
        return self.weight(name, np.asarray(values, dtype=dtype), dtype=dtype)

    def op(self, op_type: str, inputs: list[str], name: str, *, outputs: int | list[str] = 1, domain: str = "",
           **attrs):
        out_names = outputs if isinstance(outputs, list) else [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, out_names, name=name, domain=domain, **attrs))
        return out_names[0] if len(out_names) == 1 else out_names


def linear(g: Graph, x: str, lin: Linear, name: str) -> str:
    """x @ W^T (+ b); MatMul with a (in, out) initializer, which the quantizers rewrite."""
    y = g.op("MatMul", [x, g.weight(f"{name}.weight", lin.weight, transpose=True)], f"{name}/MatMul")
    if lin.bias is not None:
        y = g.op("Add", [y, g.weight(f"{name}.bias", lin.bias)], f"{name}/Add")
    return y


def rms_norm(g: Graph, x: str, norm: Norm, eps: float, name: str) -> str:
    """RMSNorm over the last axis (SimplifiedLayerNormalization, which every execution provider runs)."""
    gamma = g.weight(f"{name}.weight", norm.weight)
    return g.op("SimplifiedLayerNormalization", [x, gamma], f"{name}/SimplifiedLayerNormalization", axis=-1,
                epsilon=eps, stash_type=1)


def add_norm(g: Graph, residual: str | None, delta: str, norm: Norm | None, kind: str, eps: float, name: str):
    """(normed, new_residual): residual + delta, then RMS or Layer norm, in one fused node where there is a norm."""
    if norm is None:  # OLMo 2 has no norm before its blocks: the sum goes in as it is
        if residual is None:
            return delta, delta
        total = g.op("Add", [residual, delta], f"{name}/Add")
        return total, total
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


def activation(g: Graph, x: str, kind: str, name: str) -> str:
    if kind == "silu":
        return g.op("Mul", [x, g.op("Sigmoid", [x], f"{name}/Sigmoid")], f"{name}/Mul")
    return g.op("Gelu", [x], f"{name}/Gelu", approximate="tanh" if kind == "gelu_tanh" else "none")


def softcap(g: Graph, x: str, cap: float, dtype, name: str) -> str:
    """cap * tanh(x / cap), as transformers writes it."""
    c = g.const(f"{name}.cap", cap, dtype)
    return g.op("Mul", [g.op("Tanh", [g.op("Div", [x, c], f"{name}/Div")], f"{name}/Tanh"), c], f"{name}/Mul")

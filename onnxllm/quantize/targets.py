"""Which weights of a graph a scheme quantizes: MatMul/Gemm weights, the lm_head and the embedding Gather."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .gguf_blocks import BlockWeight
    from .schemes import Scheme

@dataclass
class _Target:
    node: object  # onnx.NodeProto
    kind: str  # linear | lm_head | embedding
    weight: str  # initializer name
    tensor: object  # its onnx.TensorProto (read when needed: a second copy of every weight costs GBs)
    transposed: bool  # stored (K, N), as MatMul wants it
    bits: int
    block: BlockWeight | None = None

    @property
    def dense(self) -> np.ndarray:
        """(N, K) float32 (a float16 weight widened exactly): rows are output features (or vocabulary entries)."""
        from onnx import numpy_helper

        array = self.tensor if isinstance(self.tensor, np.ndarray) else numpy_helper.to_array(self.tensor)
        array = array.astype(np.float32, copy=False)
        return array.T if self.transposed else array


def _matches(patterns: Iterable[str], *names: str) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def _find_targets(model, scheme: Scheme, exclude: tuple[str, ...], lm_head_bits: int, embed_bits: int,
                  block_size: int, elem_type: int = 1) -> tuple[list[_Target], list[str]]:
    """Every weight this scheme quantizes, and the names of the nodes `exclude` keeps unquantized.

    `elem_type`: the base's float type (ONNX FLOAT or FLOAT16); weights of other types are left alone.
    """
    inits = {t.name: t for t in model.graph.initializer}
    rank2 = {i.name for i in model.graph.input if len(i.type.tensor_type.shape.dim) == 2}
    targets, excluded = [], []
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "MatMul" and node.input[1] in inits:
            kind, bits, transposed = "linear", scheme.bits, True
        elif node.op_type == "Gemm" and len(node.input) == 2 and node.input[1] in inits:
            scaled = any(attrs[a].f != 1.0 for a in ("alpha", "beta") if a in attrs)
            if scaled or ("transA" in attrs and attrs["transA"].i):
                continue
            kind, bits, transposed = "lm_head", lm_head_bits, not (attrs.get("transB") and attrs["transB"].i)
        elif node.op_type == "Gather" and node.input[0] in inits and node.input[1] in rank2:
            if attrs.get("axis") and attrs["axis"].i != 0:
                continue
            kind, bits, transposed = "embedding", embed_bits, False
        else:
            continue
        weight = node.input[0] if kind == "embedding" else node.input[1]
        if bits == 0 or _matches(exclude, node.name, weight):
            excluded.append(node.name)
            continue
        tensor = inits[weight]
        if len(tensor.dims) != 2 or tensor.data_type != elem_type:
            continue
        if kind == "embedding" and tensor.dims[1] % block_size:  # gathered rows must be whole blocks
            excluded.append(node.name)
            continue
        targets.append(_Target(node, kind, weight, tensor, transposed, bits))
    return targets, excluded

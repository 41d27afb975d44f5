"""Lossless import: build MatMulNBits weights from a GGUF's own Q4_0 / Q4_1 / Q8_0 blocks.

Re-quantizing weights that are already 4-bit adds a second rounding error on top of the first;
taking llama.cpp's blocks as they are keeps the model exactly what the GGUF describes.

    Q4_0  [d f16][16 B: elem j low nibble, elem j+16 high]   w = d * (q - 8)   -> bits 4, zero point 8 (default)
    Q4_1  [d f16][m f16][16 B, same nibble order]            w = d * q + m     -> bits 4, zero point 8, offset m + 8d
    Q8_0  [d f16][32 x int8]                                 w = d * q         -> bits 8, q + 128, zero point 128

The graph fuses q/k/v rows into qkv_proj and gate/up rows into up_proj; llama.cpp stores attn_q and
attn_k with their rows permuted for its rotary layout (transformers undoes it when it loads the
GGUF). Rows are whole blocks, so permuting and concatenating them stays lossless.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..errors import OnnxLLMError, QuantizeError
from ..package import sha256_file
from .schemes import BLOCK, BlockWeight, pack

# GGUF type -> (bytes per block, bits in our layout)
_FORMATS = {"Q4_0": (18, 4), "Q4_1": (20, 4), "Q8_0": (34, 8)}
_LAYER = re.compile(r"^/model/layers\.(\d+)/(attn/qkv_proj|attn/o_proj|mlp/up_proj|mlp/down_proj)\.weight$")
_PARTS = {"attn/qkv_proj": ("attn_q", "attn_k", "attn_v"), "attn/o_proj": ("attn_output",),
          "mlp/up_proj": ("ffn_gate", "ffn_up"), "mlp/down_proj": ("ffn_down",)}
# GGUF architectures whose attn_q / attn_k rows llama.cpp permutes (transformers' LlamaTensorProcessor).
_PERMUTED_ARCHS = {"llama"}


def find_source_gguf(package_dir: str | os.PathLike, source: dict) -> tuple[Path | None, str]:
    """The GGUF a package was exported from, if it is still here with the same sha256; else (None, why)."""
    if source.get("kind") != "gguf":
        return None, "the package was not exported from a GGUF"
    candidates: list[Path] = []
    if source.get("catalog"):
        from ..catalog import resolve_catalog

        try:
            candidates.append(resolve_catalog(source["catalog"])[1])
        except OnnxLLMError as exc:  # a missing wheel is a reason to re-quantize, not to fail
            return None, f"catalog model {source['catalog']!r} is unavailable ({exc})"
    for key in ("path", "name"):
        if source.get(key):
            p = Path(str(source[key])).expanduser()
            candidates += [p, Path(package_dir) / p]
    for path in candidates:
        if path.is_file() and path.suffix.lower() == ".gguf":
            if source.get("sha256") and sha256_file(path) != source["sha256"]:
                return None, f"{path} no longer matches the sha256 recorded at export"
            return path, f"found {path}"
    return None, "the source GGUF file was not found (export recorded only its name)"


def _reverse_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation along axis 0 (as transformers does for the dense weight)."""
    dim = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, dim, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def decode_blocks(kind: str, raw: np.ndarray, rows: int) -> BlockWeight:
    """GGUF tensor bytes (rows, row_bytes) of type `kind` -> a BlockWeight holding the same numbers."""
    size = _FORMATS[kind][0]
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, -1, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q8_0":
        q = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return BlockWeight(8, pack(q, 8), d, source=kind)
    nibbles = blocks[..., 4:] if kind == "Q4_1" else blocks[..., 2:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # GGUF: elements 0..15 low, 16..31 high
    offset = None
    if kind == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        # d*q + m == d*(q - 8) + (m + 8d); m + 8d is exact in float32 (sum of two f16 values).
        offset = m + np.float32(8) * d
    return BlockWeight(4, pack(q, 4), d, offset=offset, source=kind)


def concat_rows(parts: list[BlockWeight]) -> BlockWeight:
    """Stack weights along N (rows), as the graph fuses q/k/v and gate/up."""
    if len(parts) == 1:
        return parts[0]
    if len({p.bits for p in parts}) != 1 or any(p.zero_points is not None for p in parts):
        raise ValueError("parts differ in bit width")
    offsets = [p.offset if p.offset is not None else None for p in parts]
    offset = None
    if any(o is not None for o in offsets):
        offset = np.concatenate([o if o is not None else np.zeros_like(p.scales) for o, p in zip(offsets, parts)])
    sources = sorted({p.source for p in parts})
    return BlockWeight(parts[0].bits, np.concatenate([p.packed for p in parts]),
                       np.concatenate([p.scales for p in parts]), offset=offset, source="+".join(sources))


class GGUFBlocks:
    """Reads a GGUF once; `weight(onnx_initializer_name)` gives that graph weight in MatMulNBits layout."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        try:
            self.reader = gguf.GGUFReader(str(path))
        except Exception as exc:  # noqa: BLE001 - the reader raises ValueError, struct.error... on garbage
            raise QuantizeError(f"cannot read {path} as GGUF: {exc}") from None
        self.path = Path(path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self._field("general.architecture", "")
        self.n_head = int(self._field(f"{self.arch}.attention.head_count", 0))
        self.n_kv = int(self._field(f"{self.arch}.attention.head_count_kv", self.n_head))

    def _field(self, key: str, default):
        f = self.reader.fields.get(key)
        if f is None:
            return default
        value = f.parts[f.data[0]]
        return bytes(value).decode() if f.types and f.types[0].name == "STRING" else value[0]

    def _tensor(self, name: str, *, permute_heads: int = 0) -> BlockWeight:
        import gguf

        t = self.tensors.get(name)
        if t is None:
            raise KeyError(f"the GGUF has no tensor {name}")
        kind = gguf.GGMLQuantizationType(t.tensor_type).name
        if kind not in _FORMATS:
            raise KeyError(f"GGUF type {kind} has no exact MatMulNBits form (only Q4_0, Q4_1, Q8_0 do)")
        bw = decode_blocks(kind, np.asarray(t.data), int(t.data.shape[0]))
        if permute_heads:
            bw.packed = _reverse_permute(bw.packed, permute_heads)
            bw.scales = _reverse_permute(bw.scales, permute_heads)
            if bw.offset is not None:
                bw.offset = _reverse_permute(bw.offset, permute_heads)
        return bw

    def weight(self, onnx_name: str) -> BlockWeight:
        """The weight behind an initializer of our graph; KeyError (with the reason) when there is none."""
        if onnx_name == "model.embed_tokens.weight":
            return self._tensor("token_embd.weight")
        if onnx_name == "lm_head.weight":
            return self._tensor("output.weight" if "output.weight" in self.tensors else "token_embd.weight")
        match = _LAYER.match(onnx_name)
        if not match:
            raise KeyError("no GGUF counterpart for this weight")
        layer, kind = match.groups()
        permute = self.arch in _PERMUTED_ARCHS
        parts = []
        for part in _PARTS[kind]:
            heads = (self.n_head if part == "attn_q" else self.n_kv) if permute and part in ("attn_q", "attn_k") else 0
            parts.append(self._tensor(f"blk.{layer}.{part}.weight", permute_heads=heads))
        try:
            return concat_rows(parts)
        except ValueError as exc:
            raise KeyError(f"its GGUF parts cannot be fused losslessly ({exc})") from None


def matches_dense(bw: BlockWeight, dense: np.ndarray, dtype=np.float32) -> tuple[bool, float]:
    """(ok, max |diff|): does the block weight reproduce the weight the exporter wrote (N, K)?

    Q4_0/Q8_0 must match bit for bit; Q4_1 computed as d*(q-8) + (m+8d) may differ from llama.cpp's
    d*q + m by float32 rounding (an ulp or two), never more. A float16 export (`dtype` float16) holds
    each GGUF weight rounded to float16: the blocks match when every weight is within half a float16
    ulp of it (the blocks are then the more exact of the two).
    """
    if dense.shape != bw.shape:
        return False, float("inf")
    dense = np.asarray(dense, np.float32)
    if not dense.size:
        return True, 0.0
    gap = np.abs(bw.dequantize() - dense)
    tolerance = 4 * np.finfo(np.float32).eps * max(1.0, float(np.abs(dense).max())) if bw.offset is not None else 0.0
    if np.dtype(dtype) == np.float16:
        half_ulp = np.spacing(np.abs(dense).astype(np.float16)).astype(np.float32) / 2
        return bool(np.all(gap <= half_ulp + tolerance)), float(gap.max())
    diff = float(gap.max())
    return diff <= tolerance, diff


__all__ = ["BLOCK", "GGUFBlocks", "concat_rows", "decode_blocks", "find_source_gguf", "matches_dense"]

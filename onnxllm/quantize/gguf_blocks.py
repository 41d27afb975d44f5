"""Lossless import: build MatMulNBits weights from a GGUF's own blocks, whatever llama.cpp type they are.

Re-quantizing weights that are already quantized adds a second rounding error on top of the first;
taking llama.cpp's blocks as they are keeps the model exactly what the GGUF describes. Every type
below is, per sub-block of `sub` weights, w = scale * level + offset with small integer levels, the
same arithmetic `gguf.quants.dequantize` does (so the import is bit-exact against it):

    type   sub  levels     scale           offset        as MatMulNBits
    Q4_0   32   -8..7      d               -             4-bit, default zero point 8
    Q4_1   32   0..15      d               m             4-bit, zero point 0, offset m (*)
    Q5_0   32   -16..15    d               -             8-bit, default zero point 128
    Q5_1   32   0..31      d               m             8-bit, default zero point 128, offset m
    Q8_0   32   -128..127  d               -             8-bit, default zero point 128
    Q2_K   16   0..3       d * sc          -dmin * m     4-bit, default zero point 8, offset
    Q3_K   16   -4..3      d * (sc - 32)   -             4-bit, default zero point 8
    Q4_K   32   0..15      d * sc          -dmin * m     4-bit, zero point 0, offset (*)
    Q5_K   32   0..31      d * sc          -dmin * m     8-bit, default zero point 128, offset
    Q6_K   16   -32..31    d * sc          -             8-bit, default zero point 128

(d, dmin float16; sc, m the K-quants' 4/6-bit sub-block scales. (*) the gguf scheme; int4 folds the
zero point into the offset, within an ulp, to keep its size, see to_block_weight.) A level range that fits the
operator's signed window [-2^(b-1), 2^(b-1)) is stored as level + 2^(b-1) with the default zero
point; an unsigned 0..15 range needs an explicit zero point 0. Products d * sc are exact in float32
(11 + 6 significant bits), so scale and offset are the numbers gguf computes. F32/F16/BF16 tensors
have no block form: they are float weights, never imported.

The graph fuses q/k/v rows into qkv_proj and gate/up rows into up_proj; llama.cpp stores attn_q and
attn_k with their rows permuted for its rotary layout (undone here as when the exporter loads the
GGUF). Rows are whole blocks, so permuting and concatenating them stays lossless; parts of different
layouts (Q4_K_M's Q4_K attn_q beside a Q6_K attn_v) stay separate weights, one MatMulNBits each.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import OnnxLLMError, QuantizeError
from ..package import sha256_file
from .schemes import BLOCK, BlockWeight, pack

QK_K = 256
# GGUF type -> (bytes per block, weights per block, weights per sub-block, level range).
FORMATS: dict[str, tuple[int, int, int, tuple[int, int]]] = {
    "Q4_0": (18, 32, 32, (-8, 7)), "Q4_1": (20, 32, 32, (0, 15)), "Q5_0": (22, 32, 32, (-16, 15)),
    "Q5_1": (24, 32, 32, (0, 31)), "Q8_0": (34, 32, 32, (-128, 127)),
    "Q2_K": (84, QK_K, 16, (0, 3)), "Q3_K": (110, QK_K, 16, (-4, 3)), "Q4_K": (144, QK_K, 32, (0, 15)),
    "Q5_K": (176, QK_K, 32, (0, 31)), "Q6_K": (210, QK_K, 16, (-32, 31)),
}
FLOAT_TYPES = ("F32", "F16", "BF16")
_LAYER = re.compile(r"^/model/layers\.(\d+)/(attn/qkv_proj|attn/o_proj|mlp/up_proj|mlp/down_proj)\.weight$")
_PARTS = {"attn/qkv_proj": ("attn_q", "attn_k", "attn_v"), "attn/o_proj": ("attn_output",),
          "mlp/up_proj": ("ffn_gate", "ffn_up"), "mlp/down_proj": ("ffn_down",)}
_FUSED = {"attn/qkv_proj": "attn_qkv", "mlp/up_proj": "ffn_up"}  # phi3 ships them fused already
# GGUF architectures whose attn_q / attn_k rows llama.cpp permutes (convert_hf_to_gguf's LlamaModel).
PERMUTED_ARCHS = {"llama"}


@dataclass(frozen=True)
class Levels:
    """One tensor as integers: w[r, s*sub + j] = scale[r, s] * levels[r, s, j] (+ offset[r, s])."""

    kind: str
    levels: np.ndarray  # (rows, K / sub, sub) int16
    scale: np.ndarray  # (rows, K / sub) float32
    offset: np.ndarray | None  # (rows, K / sub) float32

    def dequantize(self) -> np.ndarray:
        w = self.scale[..., None] * self.levels.astype(np.float32)
        if self.offset is not None:
            w = w + self.offset[..., None]
        return w.reshape(self.levels.shape[0], -1)


def _f16(b: np.ndarray) -> np.ndarray:
    """(..., 2) uint8 -> (...) float32."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray, group: int) -> np.ndarray:
    """(n, bytes) -> (n, bytes*2): per run of `group` bytes, all low nibbles first, then all high ones."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, group) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(n, -1)


def _bits(packed: np.ndarray, width: int, group: int) -> np.ndarray:
    """(n, bytes) -> values of `width` bits: per run of `group` bytes, shift 0 for all, then `width`..."""
    n = packed.shape[0]
    shifts = np.arange(0, 8, width, dtype=np.uint8).reshape(1, 1, -1, 1)
    return ((packed.reshape(n, -1, 1, group) >> shifts) & ((1 << width) - 1)).reshape(n, -1)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins (gguf's Q4_K.get_scale_min)."""
    n = scales.shape[0]
    d, m, m_d = np.split(scales.reshape(n, 3, 4), 3, axis=-2)
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1).reshape(n, 8)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1).reshape(n, 8)
    return sc, mn


def _decode(kind: str, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(blocks, bytes) uint8 -> levels (blocks, weights) int16, scale and offset (blocks, sub-blocks)."""
    n = b.shape[0]
    i16 = np.int16
    if kind == "Q4_0":
        return _nibbles(b[:, 2:], 16).astype(i16) - 8, _f16(b[:, 0:2])[:, None], None
    if kind == "Q4_1":
        return _nibbles(b[:, 4:], 16).astype(i16), _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]
    if kind in ("Q5_0", "Q5_1"):
        at = 2 if kind == "Q5_0" else 4
        qh = np.unpackbits(b[:, at:at + 4], axis=-1, bitorder="little")  # bit i of the u32 = element i
        q = (_nibbles(b[:, at + 4:], 16) | (qh << 4)).astype(i16)
        if kind == "Q5_0":
            return q - 16, _f16(b[:, 0:2])[:, None], None
        return q, _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]
    if kind == "Q8_0":
        return b[:, 2:].view(np.int8).astype(i16), _f16(b[:, 0:2])[:, None], None
    if kind == "Q2_K":
        scales, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
        q = _bits(qs, 2, 32).astype(i16)
        return q, d[:, None] * (scales & 0xF).astype(np.float32), -(dmin[:, None] * (scales >> 4).astype(np.float32))
    if kind == "Q3_K":
        hmask, qs, raw, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
        low = (raw[:, :8].reshape(n, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(n, 16)
        high = (raw[:, 8:].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)).reshape(n, 16)
        sc = ((low & 0x0F) | ((high & 0x03) << 4)).astype(np.float32) - 32
        hbit = _bits(hmask, 1, 32)  # (n, 256): element i's bit is hmask[i % 32] >> (i // 32)
        q = _bits(qs, 2, 32).astype(i16) - ((hbit ^ 1).astype(i16) << 2)
        return q, d[:, None] * sc, None
    if kind in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, mn = _k_scale_min(b[:, 4:16])
        if kind == "Q4_K":
            q = _nibbles(b[:, 16:], 32).astype(i16)
        else:
            qh = _bits(b[:, 16:48], 1, 32)
            q = (_nibbles(b[:, 48:], 32) | (qh << 4)).astype(i16)
        return q, d[:, None] * sc.astype(np.float32), -(dmin[:, None] * mn.astype(np.float32))
    if kind == "Q6_K":
        ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
        q = (_nibbles(ql, 64) | (_bits(qh, 2, 32) << 4)).astype(i16) - 32
        return q, d[:, None] * scales.view(np.int8).astype(np.float32), None
    raise KeyError(f"GGUF type {kind} has no block decoder")


def decode_levels(kind: str, raw: np.ndarray, rows: int) -> Levels:
    """GGUF tensor bytes (rows x row_bytes) of type `kind` -> its integer levels, scales and offsets."""
    size, per_block, sub, _ = FORMATS[kind]
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, size)
    q, scale, offset = _decode(kind, blocks)
    nsub = per_block // sub
    levels = q.reshape(rows, -1, sub)
    scale = np.broadcast_to(scale, (blocks.shape[0], nsub)).reshape(rows, -1).astype(np.float32)
    if offset is not None:
        offset = np.broadcast_to(offset, (blocks.shape[0], nsub)).reshape(rows, -1).astype(np.float32)
    return Levels(kind, levels, scale, offset)


def native_bits(kind: str) -> int:
    """The fewest MatMulNBits bits that hold this type's levels exactly."""
    lo, hi = FORMATS[kind][3]
    return 4 if (lo >= -8 and hi <= 7) or (lo >= 0 and hi <= 15) else 8


def pack_zero_points(values: np.ndarray, bits: int) -> np.ndarray:
    """(N, K/block) integer zero points -> MatMulNBits' packed uint8 (N, ceil(K/block * bits / 8))."""
    if bits == 8:
        return values.astype(np.uint8)
    if values.shape[1] % 2:
        values = np.concatenate([values, np.zeros_like(values[:, :1])], axis=1)
    return pack(values, 4)


def to_block_weight(lv: Levels, bits: int, *, exact: bool = True) -> BlockWeight:
    """Levels -> MatMulNBits layout at `bits`; ValueError when the levels do not fit that width.

    Unsigned 0..15 levels (Q4_1, Q4_K) need zero point 0, an extra 4 bits per block. `exact=False`
    folds them into the default zero point 8 instead, w = s*(q - 8) + (o + 8s): no zero-point tensor
    (the int4 scheme's size target), but o + 8s rounds in float32, so the weights are within an ulp
    or two of gguf's, not bit for bit.
    """
    lo, hi = FORMATS[lv.kind][3]
    half = 1 << (bits - 1)
    rows, nsub, sub = lv.levels.shape
    offset = lv.offset
    if lo >= -half and hi < half:
        stored, zero_points = lv.levels + half, None
    elif lo >= 0 and hi < 2 * half and not exact:
        stored, zero_points = lv.levels, None
        offset = (offset if offset is not None else np.zeros_like(lv.scale)) + np.float32(half) * lv.scale
    elif lo >= 0 and hi < 2 * half:
        stored = lv.levels
        zero_points = pack_zero_points(np.zeros((rows, nsub), np.uint8), bits)
    else:
        raise ValueError(f"GGUF {lv.kind} is {native_bits(lv.kind)}-bit, this weight is planned at {bits} "
                         f"(levels {lo}..{hi})")
    return BlockWeight(bits, pack(stored.astype(np.uint8), bits), lv.scale, zero_points, offset,
                       block_size=sub, source=lv.kind)


def decode_blocks(kind: str, raw: np.ndarray, rows: int, bits: int | None = None, *, exact: bool = True) -> BlockWeight:
    """GGUF tensor bytes (rows, row_bytes) of type `kind` -> a BlockWeight holding the same numbers."""
    return to_block_weight(decode_levels(kind, raw, rows), bits or native_bits(kind), exact=exact)


def _same_layout(parts: list[BlockWeight]) -> bool:
    return len({(p.bits, p.block_size, p.packed.shape[1:]) for p in parts}) == 1


def concat_rows(parts: list[BlockWeight]) -> BlockWeight | list[BlockWeight]:
    """Stack weights along N (rows), as the graph fuses q/k/v and gate/up; parts of different bit
    widths or block sizes come back as the list, each its own weight."""
    if len(parts) == 1:
        return parts[0]
    if not _same_layout(parts):  # fuse each run of equal layouts (Q4_K_M: q|k as one, v on its own)
        runs: list[list[BlockWeight]] = []
        for p in parts:
            if runs and _same_layout([runs[-1][-1], p]):
                runs[-1].append(p)
            else:
                runs.append([p])
        return [concat_rows(run) for run in runs]
    bits = parts[0].bits
    zero_points = None
    if any(p.zero_points is not None for p in parts):
        zero_points = np.concatenate([
            p.zero_points if p.zero_points is not None else
            pack_zero_points(np.full(p.scales.shape, 1 << (bits - 1), np.uint8), bits) for p in parts])
    offset = None
    if any(p.offset is not None for p in parts):
        offset = np.concatenate([p.offset if p.offset is not None else np.zeros_like(p.scales) for p in parts])
    sources = sorted({p.source for p in parts})
    return BlockWeight(bits, np.concatenate([p.packed for p in parts]), np.concatenate([p.scales for p in parts]),
                       zero_points, offset, block_size=parts[0].block_size, source="+".join(sources))


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


def reverse_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation along axis 0 (as transformers does for the dense weight)."""
    dim = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, dim, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _permute_rows(bw: BlockWeight, n_head: int) -> BlockWeight:
    bw.packed = reverse_permute(bw.packed, n_head)
    bw.scales = reverse_permute(bw.scales, n_head)
    if bw.zero_points is not None:
        bw.zero_points = reverse_permute(bw.zero_points, n_head)
    if bw.offset is not None:
        bw.offset = reverse_permute(bw.offset, n_head)
    return bw


class GGUFBlocks:
    """Reads a GGUF once; `weight(onnx_initializer_name)` gives that graph weight in MatMulNBits layout."""

    def __init__(self, path: str | os.PathLike):
        from ..errors import InvalidPackageError, ModelNotFoundError
        from ..exporter.gguf_model import open_reader  # parsed once per process: the export just read it

        try:
            self.reader = open_reader(path)
        except (InvalidPackageError, ModelNotFoundError) as exc:
            raise QuantizeError(f"cannot read {path} as GGUF: {exc}") from None
        self.path = Path(path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self._field("general.architecture", "")
        self.n_head = int(self._field(f"{self.arch}.attention.head_count", 0))
        self.n_kv = int(self._field(f"{self.arch}.attention.head_count_kv", self.n_head))

    def _field(self, key: str, default):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def kind(self, name: str) -> str:
        import gguf

        return gguf.GGMLQuantizationType(self.tensors[name].tensor_type).name

    def type_counts(self) -> dict[str, int]:
        """Tensor counts per GGUF type, as `info` shows the mix of a file."""
        counts: dict[str, int] = {}
        for name in self.tensors:
            counts[self.kind(name)] = counts.get(self.kind(name), 0) + 1
        return dict(sorted(counts.items()))

    def _tensor(self, name: str, bits: int | None, *, permute_heads: int = 0, exact: bool = True) -> BlockWeight:
        t = self.tensors.get(name)
        if t is None:
            raise KeyError(f"the GGUF has no tensor {name}")
        kind = self.kind(name)
        if kind in FLOAT_TYPES:
            raise KeyError(f"GGUF {name} is {kind}, a float weight with no blocks to import")
        if kind not in FORMATS:
            raise KeyError(f"GGUF type {kind} has no MatMulNBits form")
        if bits is not None and bits != native_bits(kind):
            # Held wider it would still be exact, but a 4-bit type in 8-bit MatMulNBits costs twice the
            # bytes for the same numbers, and measured worse at accuracy level 4 than int8 from fp32
            # (SmolLM2 Q4_1 at 8 bits: top-1 95.7% vs 97%+): int8 re-quantizes those instead.
            raise KeyError(f"GGUF {kind} is {native_bits(kind)}-bit, this weight is planned at {bits}")
        try:
            bw = decode_blocks(kind, np.asarray(t.data), int(t.data.shape[0]), bits, exact=exact)
        except ValueError as exc:
            raise KeyError(str(exc)) from None
        return _permute_rows(bw, permute_heads) if permute_heads else bw

    def weight(self, onnx_name: str, bits: int | None = None, *, exact: bool = True) -> BlockWeight | list[BlockWeight]:
        """The weight behind an initializer of our graph, at `bits` (None: each part's own width);
        a list of row parts when the fused parts differ in layout; KeyError (with the reason) when
        there is none. `exact`: see to_block_weight."""
        if onnx_name == "model.embed_tokens.weight":
            return self._tensor("token_embd.weight", bits, exact=exact)
        if onnx_name == "lm_head.weight":
            name = "output.weight" if "output.weight" in self.tensors else "token_embd.weight"
            return self._tensor(name, bits, exact=exact)
        match = _LAYER.match(onnx_name)
        if not match:
            raise KeyError("no GGUF counterpart for this weight")
        layer, kind = match.groups()
        fused = f"blk.{layer}.{_FUSED.get(kind, '')}.weight"
        if kind in _FUSED and fused in self.tensors and f"blk.{layer}.{_PARTS[kind][0]}.weight" not in self.tensors:
            return self._tensor(fused, bits, exact=exact)
        permute = self.arch in PERMUTED_ARCHS
        parts = []
        for part in _PARTS[kind]:
            heads = (self.n_head if part == "attn_q" else self.n_kv) if permute and part in ("attn_q", "attn_k") else 0
            parts.append(self._tensor(f"blk.{layer}.{part}.weight", bits, permute_heads=heads, exact=exact))
        return concat_rows(parts)


def parts_of(bw: BlockWeight | list[BlockWeight]) -> list[BlockWeight]:
    return bw if isinstance(bw, list) else [bw]


def dequantize_parts(bw: BlockWeight | list[BlockWeight]) -> np.ndarray:
    return np.concatenate([p.dequantize() for p in parts_of(bw)])


def matches_dense(bw: BlockWeight | list[BlockWeight], dense: np.ndarray, dtype=np.float32, *,
                  exact: bool = True) -> tuple[bool, float]:
    """(ok, max |diff|): does the block weight reproduce the weight the exporter wrote (N, K)?

    Every block type is computed as gguf computes it, so against a float32 export the blocks must
    match bit for bit; folded offsets (`exact` False, see to_block_weight) may differ by float32
    rounding (an ulp or two), never more. A float16 export (`dtype` float16) holds each GGUF weight rounded to float16:
    the blocks match when every weight is within half a float16 ulp of it (the blocks are then the
    more exact of the two).
    """
    parts = parts_of(bw)
    n = sum(p.shape[0] for p in parts)
    if dense.shape != (n, parts[0].shape[1]):
        return False, float("inf")
    dense = np.asarray(dense, np.float32)
    if not dense.size:
        return True, 0.0
    gap = np.abs(dequantize_parts(parts) - dense)
    diff = float(gap.max())
    folded = not exact and any(p.offset is not None for p in parts)
    tolerance = 4 * np.finfo(np.float32).eps * max(1.0, float(np.abs(dense).max())) if folded else 0.0
    if np.dtype(dtype) == np.float16:
        half_ulp = np.spacing(np.abs(dense).astype(np.float16)).astype(np.float32) / 2
        return bool(np.all(gap <= half_ulp + tolerance)), diff
    return diff <= tolerance, diff


__all__ = ["BLOCK", "FORMATS", "GGUFBlocks", "Levels", "concat_rows", "decode_blocks", "decode_levels",
           "dequantize_parts", "find_source_gguf", "matches_dense", "native_bits", "parts_of", "reverse_permute",
           "to_block_weight"]

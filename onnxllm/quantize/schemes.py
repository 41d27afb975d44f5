"""What each quantization scheme is, and how its weights are laid out for ONNX Runtime's operators.

Weights are stored in the layout of com.microsoft MatMulNBits: for a weight W of shape (N, K)
(output features, input features) quantized in blocks of `block_size` along K,

    packed (N, K / block, block * bits / 8) uint8   element 2i in the low nibble, 2i+1 in the high (4 bits)
    scales (N, K / block) float32
    zero_points None (the operator's default 2^(bits-1): "symmetric"), or packed uint8

    W[n, k] = (q[n, k] - zero_point[n, k // block]) * scale[n, k // block]  (+ offset[n, k // block], see below)

GatherBlockQuantized reads the same `packed` tensor when given as (N, K / block, blob) with
quantize_axis=2, so a tied embedding and lm_head share one quantized tensor on disk.

A GGUF Q4_1 block (w = d*q + m) becomes MatMulNBits with scale d and the default zero point 8 plus a
per-block `offset` m + 8d, applied as block_sums(x) @ offset^T next to the MatMulNBits (see
quantize.py): MatMulNBits accepts float zero points (-m/d), but its CPU kernel is ~140x slower with
them (7.3 ms vs 0.05 ms for 576x3072 at M=1, measured), so the offset form is the fast exact one.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np

BLOCK = 32  # GGUF's Q4_0/Q4_1/Q8_0 block, and MatMulNBits' usual one


@dataclass(frozen=True)
class Scheme:
    """A quantization scheme: bit widths per kind of weight, the file it writes, its quality targets."""

    name: str
    bits: int  # transformer-layer MatMuls
    file: str  # relative to the package root
    lm_head_bits: int  # 0: keep fp32
    embed_bits: int  # 0: keep fp32
    max_size_ratio: float  # of the fp32 model's bytes
    max_ppl_increase: float  # relative to fp32 (0.01 = 1%)
    min_top1: float  # share of positions whose argmax equals fp32's
    description: str


# lm_head/embedding at 8 bits for int4: measured on SmolLM2 (docs/QUANTIZATION.md), 4-bit lm_head
# costs most of the int4 top-1 loss while it saves only ~14 MB.
SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("int8", 8, "onnx/model_int8.onnx", 8, 8, 0.30, 0.01, 0.97,
               "8-bit weights (MatMulNBits bits=8, block 32), embedding and lm_head 8-bit"),
        Scheme("int4", 4, "onnx/model_q4.onnx", 8, 8, 0.20, 0.05, 0.90,
               "4-bit weights (MatMulNBits bits=4, block 32), embedding and lm_head 8-bit"),
    )
}
# Top-1 agreement below this earns a loud warning whatever the scheme.
WARN_TOP1 = 0.90
# An int4 variant imported losslessly from GGUF Q4 blocks is the fp32 model's own weights.
LOSSLESS_MIN_TOP1 = 0.995


@dataclass
class BlockWeight:
    """One (N, K) weight in MatMulNBits layout; `offset` (N, K/block) float32 is the Q4_1 extra term."""

    bits: int
    packed: np.ndarray  # (N, K/block, blob) uint8
    scales: np.ndarray  # (N, K/block) float32
    zero_points: np.ndarray | None = None  # packed uint8 as MatMulNBits wants it; None = 2^(bits-1)
    offset: np.ndarray | None = None  # (N, K/block) float32: W += offset per block
    block_size: int = BLOCK
    source: str = "requantized"  # or the GGUF type it came from: Q4_0 | Q4_1 | Q8_0

    @property
    def shape(self) -> tuple[int, int]:
        n, kb, _ = self.packed.shape
        return n, kb * self.block_size

    def values(self) -> np.ndarray:
        """The quantized integers q, (N, K/block, block) uint8."""
        return unpack(self.packed, self.bits)

    def zero_point_values(self) -> np.ndarray:
        """The zero points as (N, K/block) float32, defaults filled in."""
        n, kb, _ = self.packed.shape
        if self.zero_points is None:
            return np.full((n, kb), 2 ** (self.bits - 1), np.float32)
        if self.zero_points.dtype != np.uint8:
            return self.zero_points.astype(np.float32)
        zp = unpack(self.zero_points.reshape(n, 1, -1), self.bits).reshape(n, -1)
        return zp[:, :kb].astype(np.float32)

    def dequantize(self) -> np.ndarray:
        """W (N, K) float32, computed the way the operator defines it: (q - zp) * scale (+ offset)."""
        q = self.values().astype(np.float32)
        w = (q - self.zero_point_values()[..., None]) * self.scales[..., None]
        if self.offset is not None:
            w = w + self.offset[..., None]
        return w.reshape(self.shape)

    def nbytes(self) -> int:
        extra = sum(a.nbytes for a in (self.zero_points, self.offset) if a is not None)
        return self.packed.nbytes + self.scales.nbytes + extra


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """(..., n) integer values -> (..., n * bits / 8) uint8 in MatMulNBits order (low nibble first)."""
    q = q.astype(np.uint8)
    if bits == 8:
        return q
    if bits != 4:
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    return (q[..., 0::2] & 0x0F) | ((q[..., 1::2] & 0x0F) << 4)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of `pack`."""
    if bits == 8:
        return packed
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


@contextlib.contextmanager
def ort_quantizer() -> Iterator[object]:
    """ONNX Runtime's matmul_nbits_quantizer module, imported and used without its logging side effects.

    On import it calls logging.basicConfig(level=INFO), which would make every later log line of the
    host program print; and it logs one INFO line per node. A handler on the root logger makes
    basicConfig a no-op; the module's own logger is held at WARNING while we use it.
    """
    root = logging.getLogger()
    guard = logging.NullHandler()
    root.addHandler(guard)
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer as module
    finally:
        root.removeHandler(guard)
    logger = logging.getLogger(module.__name__)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield module
    finally:
        logger.setLevel(level)


def quantize_rows(w: np.ndarray, bits: int, *, block_size: int = BLOCK, symmetric: bool = True) -> BlockWeight:
    """Quantize W (N, K) with ONNX Runtime's own blockwise quantizer (the C++ kernel its tools use)."""
    with ort_quantizer() as ortq:
        config = ortq.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits)
        # The quantizer takes the MatMul layout (K, N) and returns MatMulNBits' (N, K/block, blob).
        packed, scales, zero_points = ortq.DefaultWeightOnlyQuantizer(config).qbits_block_quant(
            np.ascontiguousarray(w.T, dtype=np.float32))
    return BlockWeight(bits, packed, scales, None if symmetric else zero_points, block_size=block_size)

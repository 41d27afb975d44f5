"""What each quantization scheme is, and how its weights are laid out for ONNX Runtime's operators.

Weights are stored in the layout of com.microsoft MatMulNBits: for a weight W of shape (N, K)
(output features, input features) quantized in blocks of `block_size` along K,

    packed (N, K / block, block * bits / 8) uint8   element 2i in the low nibble, 2i+1 in the high (4 bits)
    scales (N, K / block) float32 here; written in the graph's float type (MatMulNBits wants A's type)
    zero_points None (the operator's default 2^(bits-1): "symmetric"), or packed uint8

    W[n, k] = (q[n, k] - zero_point[n, k // block]) * scale[n, k // block]  (+ offset[n, k // block], see below)

GatherBlockQuantized reads the same `packed` tensor when given as (N, K / block, blob) with
quantize_axis=2, so a tied embedding and lm_head share one quantized tensor on disk.

A GGUF Q4_1 block (w = d*q + m) becomes MatMulNBits with scale d and zero point 0 plus a per-block
`offset` m, applied as block_sums(x) @ offset^T next to the MatMulNBits (see quantize.py); the
K-quants with mins likewise (gguf_blocks.py): MatMulNBits accepts float zero points (-m/d), but its
CPU kernel is ~140x slower with them (7.3 ms vs 0.05 ms for 576x3072 at M=1, measured), so the offset
form is the fast exact one.

A float16 graph (the fp16 variant, for CUDA) gets the same weights: quantized in float32, then its
scales, float zero points and Q4_1 offsets written as float16, since MatMulNBits requires scales of
its input's type and GatherBlockQuantized outputs its scales' type.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MS_DOMAIN = "com.microsoft"
BLOCK = 32  # GGUF's Q4_0/Q4_1/Q8_0 block, and MatMulNBits' usual one


@dataclass(frozen=True)
class Prepare:
    """What a scheme's `prepare` hook gets besides the base graph: the package, and the user's exclusions."""

    root: Path
    manifest: object  # package.Manifest
    excluded: Callable[[str], bool]  # node name -> kept in full precision (--exclude)
    say: Callable[[str], None]


@dataclass(frozen=True)
class Scheme:
    """A quantization scheme: bit widths per kind of weight, the file it writes, its quality targets,
    and its hooks into quantize(): what base it takes and what it does to the graph before the weights
    are quantized (quantize.py asks these, never the scheme's name)."""

    name: str
    bits: int  # transformer-layer MatMuls
    file: str  # relative to the package root
    lm_head_bits: int  # 0: keep fp32
    embed_bits: int  # 0: keep fp32
    max_size_ratio: float  # of the fp32 model's bytes
    max_ppl_increase: float  # relative to fp32 (0.01 = 1%)
    min_top1: float  # share of positions whose argmax equals fp32's
    description: str
    # The layers' operator: MatMulNBits at `bits`, or another one `prepare` converts them to.
    layer_operator: str = "MatMulNBits"
    # CPU-only kernels (DynamicQuantizeMatMul): the base must be the fp32 variant.
    cpu_only: bool = False
    # Rewrites the base graph before its remaining weights become MatMulNBits; returns the report
    # recorded as the method's `dynamic` (None: nothing to do).
    prepare: Callable[[object, Prepare], dict] | None = None
    # Every weight from the source GGUF's own blocks at its type's width (gguf_blocks.py); needs a GGUF source.
    native_gguf: bool = False
    max_kl: float = 1.0  # mean KL(fp32 || variant), nats, on the worst route (quantize/fidelity.py)
    accuracy_level: int | None = None  # MatMulNBits' activation precision when the scheme fixes it
    lm_head_accuracy_level: int | None = None  # the lm_head's, when it differs from the layers'


def _smooth_and_convert(model, ctx: Prepare) -> dict:
    """int8-dynamic: calibrate, fold the smoothing scales, convert qkv/o/gate|up (see dynamic.py)."""
    from .dynamic import CALIBRATION_TEXT, smooth_and_convert
    from .quality import tokenize

    ctx.say("calibrating activation ranges and folding the smoothing scales")
    context = ctx.manifest.architecture.context_length
    calibration = tokenize(ctx.root, ctx.manifest, CALIBRATION_TEXT, min(512, context))
    return smooth_and_convert(model, ctx.manifest, calibration, exclude=ctx.excluded)


# lm_head/embedding at 8 bits for int4, measured on SmolLM2 (docs/QUANTIZATION.md): at 4 bits the
# shared table saves 13.5 MiB but costs 10 points of top-1 (97.3% -> 86.7%) and +6.3% perplexity,
# missing the int4 targets; at 8 bits the variant is 20.0% of fp32 and within them.
SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("int8", 8, "onnx/model_int8.onnx", 8, 8, 0.30, 0.01, 0.97,
               "8-bit weights (MatMulNBits bits=8, block 32), embedding and lm_head 8-bit", max_kl=0.01),
        Scheme("int4", 4, "onnx/model_q4.onnx", 8, 8, 0.20, 0.05, 0.90,
               "4-bit weights (MatMulNBits bits=4, block 32), embedding and lm_head 8-bit"),
        # The GGUF's own blocks, each tensor at its own precision (gguf_blocks.py): the model the file
        # holds, so its targets are int8's; its size is the file's mix, not a target.
        Scheme("gguf", 4, "onnx/model_gguf.onnx", 8, 8, 1.0, 0.01, 0.97,
               "the source GGUF's own blocks, imported exactly: 4-bit MatMulNBits for Q4_0/Q4_1/Q4_K/Q3_K/Q2_K, "
               "8-bit for Q5_0/Q5_1/Q5_K/Q6_K/Q8_0, float tensors kept float", native_gguf=True),
        # The GGUF's own 4-bit blocks (imported exactly) computed with float32 activations (accuracy level 1):
        # the layers round nothing fp32 does not, where int8 activations in them cost 2-6 points of top-1
        # (docs/BENCHMARKS.md, fidelity). The lm_head is 8-bit at accuracy level 4 (int8 activations in
        # blocks of 32): MatMulNBits has no fast 8-bit kernel below level 4, a float32 head is 113 of the
        # 211 MiB read per SmolLM2 token, and the head alone at level 4 measured top-1 98.2%, KL 0.0008 on the
        # corpus, at 1.1-1.35x the decode speed of the float32 head (--lm-head-bits 0 keeps that one).
        # Re-quantized (no GGUF source) it is plain RTN int4 and misses its targets.
        Scheme("int4-exact", 4, "onnx/model_q4_exact.onnx", 8, 8, 0.45, 0.01, 0.97,
               "4-bit weights imported from GGUF blocks, float32 activations (accuracy level 1); lm_head and "
               "embedding 8-bit, the lm_head with int8 activations (level 4)", max_kl=0.01, accuracy_level=1,
               lm_head_accuracy_level=4),
        Scheme("int8-dynamic", 8, "onnx/model_int8_dynamic.onnx", 8, 8, 0.30, 0.01, 0.97,
               "8-bit weights; qkv, o and gate|up as DynamicQuantizeMatMul after smoothing (fast prefill), "
               "down_proj, embedding and lm_head as int8 (see quantize/dynamic.py)",
               layer_operator="DynamicQuantizeMatMul + MatMulNBits", cpu_only=True, prepare=_smooth_and_convert,
               max_kl=0.01),
    )
}
# Top-1 agreement below this earns a loud warning whatever the scheme.
WARN_TOP1 = 0.90
# An int4 variant imported losslessly from GGUF Q4 blocks is the fp32 model's own weights.
LOSSLESS_MIN_TOP1 = 0.995


@dataclass
class BlockWeight:
    """One (N, K) weight in MatMulNBits layout; `offset` (N, K/block) float32 is the GGUF min term."""

    bits: int
    packed: np.ndarray  # (N, K/block, blob) uint8
    scales: np.ndarray  # (N, K/block) float32
    zero_points: np.ndarray | None = None  # packed uint8 as MatMulNBits wants it; None = 2^(bits-1)
    offset: np.ndarray | None = None  # (N, K/block) float32: W += offset per block
    block_size: int = BLOCK
    source: str = "requantized"  # or the GGUF type it came from: Q4_0 | Q4_K | Q6_K ...
    k: int = 0  # input features when K is not a whole number of blocks (the last block is padded)

    @property
    def shape(self) -> tuple[int, int]:
        n, kb, _ = self.packed.shape
        return n, self.k or kb * self.block_size

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
        n, k = self.shape
        return w.reshape(n, -1)[:, :k]

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
    return BlockWeight(bits, packed, scales, None if symmetric else zero_points, block_size=block_size, k=w.shape[1])


def _block_sum(model, k: int, block: int, dtype=np.float32) -> str:
    """A shared (K, K/block) 0/1 matrix of the graph's float type: x @ it sums x over each block (Q4_1)."""
    from onnx import numpy_helper

    dtype = np.dtype(dtype)
    name = f"/quantize/block_sum_{k}x{block}" + ("" if dtype == np.float32 else f"_{dtype.name}")
    if not any(t.name == name for t in model.graph.initializer):
        p = np.kron(np.eye(k // block, dtype=dtype), np.ones((block, 1), dtype))  # 0 and 1: exact in float16
        model.graph.initializer.append(numpy_helper.from_array(p, name))
    return name


def replacement_nodes(model, kind: str, node, weight: str, bw: BlockWeight, accuracy_level: int,
                      shared: dict, dtype=np.float32) -> list:
    """The nodes that replace `node` (kind: linear | lm_head | embedding) by its quantized form `bw`.

    Adds bw's initializers to `model`, or reuses them through `shared` (keyed by the original weight
    and bits) when a tied lm_head already added them. `dtype` is the graph's float type (float32 or
    float16): scales, float zero points and offsets are written in it.
    """
    from onnx import helper, numpy_helper

    dtype = np.dtype(dtype)
    n, k = bw.shape
    base, key = weight + f"_Q{bw.bits}", (weight, bw.bits)
    if shared.get(key, bw) is not bw:  # same fp32 weight, different quantized form (quantize._build)
        base, key = base + f"_{kind}", (weight + kind, bw.bits)
    if key not in shared:  # one packed tensor serves both the lm_head and a tied embedding
        model.graph.initializer.extend([numpy_helper.from_array(bw.packed, base),
                                        numpy_helper.from_array(bw.scales.astype(dtype), base + "_scales")])
        if bw.zero_points is not None:  # packed uint8, or float zero points (then of the scales' type)
            zp = bw.zero_points if bw.zero_points.dtype == np.uint8 else bw.zero_points.astype(dtype)
            model.graph.initializer.append(numpy_helper.from_array(zp, base + "_zero_points"))
        shared[key] = bw
    x, out, name = node.input[1 if kind == "embedding" else 0], node.output[0], node.name
    if kind == "embedding":
        return _embedding_nodes(model, node, base, bw, dtype)
    inputs = [x, base, base + "_scales"] + ([base + "_zero_points"] if bw.zero_points is not None else [])
    attrs = {"K": k, "N": n, "bits": bw.bits, "block_size": bw.block_size}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    if bw.offset is None:
        return [helper.make_node("MatMulNBits", inputs, [out], name=name + f"_Q{bw.bits}", domain=MS_DOMAIN, **attrs)]
    # GGUF offsets: y = MatMulNBits(x) + block_sums(x) @ offset^T. Q4_1's offsets (m) are f16 values,
    # stored f16 (2 bytes/block, not 4); K-quants' (dmin * m) mostly are not, and stay f32. A float16
    # graph computes in f16 anyway: its offsets are stored f16 (rounded, in the rare inexact case).
    offset_t = np.ascontiguousarray(bw.offset.T)
    half = offset_t.astype(np.float16)
    exact = bool(np.array_equal(half.astype(np.float32), offset_t))
    stored = half if exact or dtype == np.float16 else offset_t
    model.graph.initializer.append(numpy_helper.from_array(stored, base + "_offset"))
    nodes = [helper.make_node("MatMulNBits", inputs, [name + "/nbits"], name=name + f"_Q{bw.bits}", domain=MS_DOMAIN,
                              **attrs),
             helper.make_node("MatMul", [x, _block_sum(model, k, bw.block_size, dtype)], [name + "/block_sums"],
                              name=name + "/BlockSum")]
    offset = base + "_offset"
    if stored.dtype != dtype:
        nodes.append(helper.make_node("Cast", [offset], [name + "/offset"], name=name + "/OffsetCast",
                                      to=helper.np_dtype_to_tensor_dtype(dtype)))
        offset = name + "/offset"
    nodes += [helper.make_node("MatMul", [name + "/block_sums", offset], [name + "/offsets"], name=name + "/Offset"),
              helper.make_node("Add", [name + "/nbits", name + "/offsets"], [out], name=name + "/Add")]
    return nodes


def _embedding_nodes(model, node, base: str, bw: BlockWeight, dtype) -> list:
    """GatherBlockQuantized rows of the packed table, plus the gathered per-block offsets (GGUF Q4_1/K-quants).

        ids ─ GatherBlockQuantized(q, scales, zero points) ─ (B, T, K/block, block) ─ Add ─ Reshape(B, T, K)
          └── Gather(offset rows) ─ (B, T, K/block) ─ Unsqueeze(-1) ──────────────────┘
    """
    from onnx import helper, numpy_helper

    n, k = bw.shape
    x, out, name = node.input[1], node.output[0], node.name
    inputs = [base, x, name + "/scales"]
    nodes = [helper.make_node("Reshape", [base + "_scales", name + "/scales_shape"], [name + "/scales"],
                              name=name + "/ScalesReshape")]
    shape3 = numpy_helper.from_array(np.asarray([n, k // bw.block_size, 1], np.int64), name + "/scales_shape")
    flat = numpy_helper.from_array(np.asarray([0, 0, k], np.int64), name + "/out_shape")
    model.graph.initializer.extend([shape3, flat])
    if bw.zero_points is not None:  # GatherBlockQuantized wants zero points shaped like its scales
        zp = bw.zero_point_values().astype(np.uint8).reshape(n, -1, 1)
        model.graph.initializer.append(numpy_helper.from_array(zp, name + "/zero_points"))
        inputs.append(name + "/zero_points")
    blocks = name + "/blocks"
    nodes.append(helper.make_node("GatherBlockQuantized", inputs, [blocks], name=name + f"_Q{bw.bits}",
                                  domain=MS_DOMAIN, bits=bw.bits, block_size=bw.block_size, gather_axis=0,
                                  quantize_axis=2))
    if bw.offset is not None:
        model.graph.initializer.extend([numpy_helper.from_array(bw.offset.astype(dtype), name + "/offset_rows"),
                                        numpy_helper.from_array(np.asarray([-1], np.int64), name + "/last_axis")])
        nodes += [helper.make_node("Gather", [name + "/offset_rows", x], [name + "/offsets"], name=name + "/Offsets"),
                  helper.make_node("Unsqueeze", [name + "/offsets", name + "/last_axis"], [name + "/offsets4"],
                                   name=name + "/OffsetsUnsqueeze"),
                  helper.make_node("Add", [blocks, name + "/offsets4"], [name + "/shifted"], name=name + "/OffsetAdd")]
        blocks = name + "/shifted"
    nodes.append(helper.make_node("Reshape", [blocks, name + "/out_shape"], [out], name=name + "/Reshape"))
    return nodes

"""int8 for embedding packages: MatMulNBits (8-bit blocks), gated by cosine similarity to fp32.

    MatMul(x, W)  -> MatMulNBits(x, q, scales)   8-bit symmetric blocks of 32 along K, ONNX Runtime's
                                                  quantizer; accuracy_level 4: int8 activations per block
    Attention     -> kept fp32 (its packed QKV weight is not a MatMul input)

Why not ORT's quantize_dynamic (QAttention + MatMulInteger, one activation scale per call): measured
on all-MiniLM-L6-v2, its worst cosine to fp32 over CHECK_TEXTS was 0.979 even with the FFN's second
MatMul kept fp32 (the short text "ok" is the worst: a per-tensor scale is set by the [CLS]/[SEP]
outliers), against 0.9992 for 8-bit blocks. The variant becomes the CPU default only when every text
of the check set keeps cosine >= MIN_COSINE with the fp32 vectors.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import QuantizeError
from ..package import Variant, onnx_bytes, read_manifest, safe_path, save_onnx, write_manifest
from .schemes import ort_quantizer

Progress = Callable[[str], None]
MIN_COSINE = 0.99
BLOCK = 32  # all-MiniLM-L6-v2: worst cosine 0.9992 at 32, 0.9975 at 128
ACCURACY_LEVEL = 4
# Texts the gate embeds: short and long, questions, code, numbers, non-English, none of them the tests'.
CHECK_TEXTS = (
    "The river rose for three days before anyone in the valley thought to move the grain.",
    "How do I reset my password if I no longer have access to my email?",
    "Quarterly revenue was $4.2 million, up 17% from a year earlier; operating costs fell 3.5%.",
    "def moving_average(values, window=3): return [sum(values[i:i + window]) / window for i in range(len(values))]",
    "Photosynthesis converts light energy into chemical energy inside the chloroplasts of plant cells.",
    "Best pizza near the train station that is open after midnight?",
    "La tour Eiffel a été construite pour l'Exposition universelle de 1889.",
    "Der Zug nach Berlin fährt heute wegen Bauarbeiten zwanzig Minuten später ab.",
    "SELECT name, COUNT(*) FROM customers JOIN orders USING (customer_id) GROUP BY name;",
    "ok",
    "The committee postponed the vote on the new budget until the auditors finish their review of last year's "
    "accounts, which several members described as incomplete and, in places, contradictory.",
    "In 1969 the first humans walked on the Moon while millions watched on television.",
    "Symptoms of dehydration include thirst, dark urine, fatigue and dizziness.",
    "My cat keeps knocking glasses off the table at three in the morning.",
    "Gradient descent updates each weight in the direction that lowers the loss.",
    "東京は日本の首都で、世界で最も人口の多い都市圏の一つです。",
)


@dataclass(frozen=True)
class EmbeddingQuantizeResult:
    variant: str
    file: Path
    bytes: int
    size_ratio: float
    min_cosine: float | None  # worst cosine to fp32 over CHECK_TEXTS; None when not evaluated
    mean_cosine: float | None
    meets_targets: bool | None
    default_for: tuple[str, ...]
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.variant}: {self.file} ({self.bytes / 2**20:.1f} MiB, {self.size_ratio:.2f}x fp32) "
                 f"in {self.seconds:.1f}s"]
        if self.min_cosine is not None:
            verdict = (f"yes, default on {', '.join(self.default_for)}" if self.meets_targets
                       else "no, not made the default")
            lines.append(f"cosine to fp32 over {len(CHECK_TEXTS)} texts: min {self.min_cosine:.4f}, mean "
                         f"{self.mean_cosine:.4f} (target >= {MIN_COSINE}: {verdict})")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def _cosines(root: Path, base: str, candidate: Path) -> np.ndarray:
    """Cosine of each CHECK_TEXTS vector of `candidate` to the `base` variant's (tokenized the same way)."""
    import onnxruntime as ort

    from ..runtime.embed import EmbeddingModel
    from ..runtime.model import LoadOptions, load_package
    from ..runtime.providers import session_options

    reference = load_package(root, LoadOptions(device="cpu", variant=base))
    session = ort.InferenceSession(str(candidate), sess_options=session_options(), providers=["CPUExecutionProvider"])
    quantized = EmbeddingModel(root, reference.manifest, "int8", session, reference.tokenizer, reference.placement)
    a = np.asarray(reference.embed(CHECK_TEXTS, normalize=True))
    b = np.asarray(quantized.embed(CHECK_TEXTS, normalize=True))
    return np.sum(a * b, axis=1)


def quantize_embedding(package_dir: str | Path, scheme: str, *, force: bool = False, evaluate: bool = True,
                       progress: Progress | None = None) -> EmbeddingQuantizeResult:
    """Add an int8 variant to an embedding package (fp32 base only read; the manifest written last)."""
    import onnx

    root = Path(package_dir)
    manifest = read_manifest(root)
    if scheme != "int8":
        raise QuantizeError(f"embedding packages take --scheme int8 only (8-bit MatMulNBits blocks), not {scheme!r}")
    if "fp32" not in manifest.variants:
        raise QuantizeError(f"{root} has no fp32 variant to quantize from; re-export it")
    if "int8" in manifest.variants and not force:
        raise QuantizeError(f"{root} already has an int8 variant; pass --force (force=True) to replace it")
    start = time.perf_counter()
    base_path = safe_path(root, manifest.variants["fp32"].file)
    final = safe_path(root, "onnx/model_int8.onnx")
    if progress:
        progress("quantizing (8-bit MatMulNBits)...")
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=root) as scratch:
        model = onnx.load(str(base_path))
        with ort_quantizer() as ortq:
            config = ortq.DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=True, bits=8,
                                                       accuracy_level=ACCURACY_LEVEL)
            quantizer = ortq.MatMulNBitsQuantizer(model, algo_config=config)
            quantizer.process()
            model = quantizer.model.model
        replaced = sum(n.op_type == "MatMulNBits" for n in model.graph.node)
        candidate = Path(scratch) / "model_int8.onnx"
        save_onnx(model, candidate)
        del model
        cos = None
        if evaluate:
            if progress:
                progress("checking cosine similarity to fp32...")
            cos = _cosines(root, "fp32", candidate)
        meets = None if cos is None else bool(cos.min() >= MIN_COSINE)
        for suffix in ("", ".data"):
            shutil.move(str(candidate) + suffix, str(final) + suffix)
    size = onnx_bytes(final)
    ratio = size / max(1, onnx_bytes(base_path))
    method = {"quantizer": "onnxruntime MatMulNBitsQuantizer", "operator": "MatMulNBits", "bits": 8,
              "block_size": BLOCK, "symmetric": True, "accuracy_level": ACCURACY_LEVEL, "matmuls": replaced,
              "kept_fp32": "Attention (packed QKV), embeddings, pooling",
              "min_cosine_to_fp32": None if cos is None else round(float(cos.min()), 6),
              "mean_cosine_to_fp32": None if cos is None else round(float(cos.mean()), 6),
              "meets_targets": meets, "seconds": round(time.perf_counter() - start, 2)}
    default_for = ("cpu",) if meets else ()
    updated = manifest.with_variant("int8", Variant(file="onnx/model_int8.onnx", scheme="int8", dtype="float32",
                                                    bytes=size, method=method), default_for=default_for)
    if not meets and updated.default_variant.get("cpu") == "int8":  # a replaced int8 that now misses: fp32 again
        updated = updated.with_variant("fp32", updated.variants["fp32"], default_for=("cpu",))
    write_manifest(root, updated)
    notes = [] if meets is not False else [f"int8 keeps cosine {cos.min():.4f} < {MIN_COSINE} on some text"]
    return EmbeddingQuantizeResult("int8", final, size, ratio, None if cos is None else float(cos.min()),
                                   None if cos is None else float(cos.mean()), meets, default_for,
                                   seconds=time.perf_counter() - start, warnings=notes)

"""int8 for embedding packages: SmoothQuant-style smoothing, then ONNX Runtime's dynamic int8, gated by cosine.

    Attention(x, Wqkv)       -> QAttention(x * 1/s, s * Wqkv)       int8 weights per channel, activations
    MatMul(x, W) FFN in      -> MatMulInteger(q(x * 1/s), q(s * W))  quantized per call (VNNI/AMX int8 GEMM)
    MatMul(x, W) attn out    -> MatMulInteger(q(x), q(W))
    MatMul(gelu(h), W)       -> kept fp32
    EmbedLayerNormalization  -> QEmbedLayerNormalization             int8 embedding tables

One activation scale per call is set by a few outlier channels (BERT's [CLS]/[SEP] rows), so for each
product x @ W fed by a LayerNorm, s_j = max|x_j|^ALPHA / max|W_j|^(1 - ALPHA) (measured on calibration text,
not the check texts) moves that range into the weights: x @ W = (x / s) @ (s W). In a post-norm encoder the
norm's output is also the residual, so 1/s cannot be folded into the norm (as quantize/dynamic.py does for
decoders): it is one Mul per product. Measured on all-MiniLM-L6-v2, worst cosine to fp32 over CHECK_TEXTS:
0.979 without smoothing, 0.994 with it (alpha 0.5; 0.7: 0.993); smoothing and quantizing the FFN's second
product too: 0.969. 8-bit MatMulNBits blocks keep 0.9992 but ran slower than fp32 here. The variant becomes
the CPU default only when every check text keeps cosine >= MIN_COSINE with the fp32 vectors.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import QuantizeError
from ..package import Variant, load_onnx, onnx_bytes, read_manifest, safe_path, save_onnx, write_manifest
from .dynamic import CALIBRATION_TEXT

Progress = Callable[[str], None]
MIN_COSINE = 0.99
ALPHA = 0.5
_GELU_OPS = {"Gelu", "BiasGelu", "FastGelu"}
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


def _targets(model) -> tuple[list, list[str]]:
    """(products to smooth: Attention and each FFN's first MatMul, names of the MatMuls fed by a GELU)."""
    inits = {t.name for t in model.graph.initializer}
    produced_by = {out: node for node in model.graph.node for out in node.output}
    feeds_gelu = {node.input[0] for node in model.graph.node if node.op_type in _GELU_OPS}
    smooth = [n for n in model.graph.node if n.input[1:2] and n.input[1] in inits
              and (n.op_type == "Attention" or (n.op_type == "MatMul" and n.output[0] in feeds_gelu))]
    after_gelu = [n.name for n in model.graph.node if n.op_type == "MatMul"
                  and getattr(produced_by.get(n.input[0]), "op_type", None) in _GELU_OPS]
    return smooth, after_gelu


def _activation_ranges(model, names: list[str], tokenizer) -> dict[str, np.ndarray]:
    """max |x_j| of each named activation over the calibration text, one line per run (no padding)."""
    from .dynamic import probe_session

    session = probe_session(model, names)
    ranges: dict[str, np.ndarray] = {}
    for line in (ln for ln in CALIBRATION_TEXT.splitlines() if ln.strip()):
        ids = np.array([tokenizer.encode(line).ids], dtype=np.int64)  # (1, T)
        for name, value in zip(names, session.run(names, {"input_ids": ids, "attention_mask": np.ones_like(ids)})):
            peak = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)  # (D,)
            ranges[name] = np.maximum(ranges[name], peak) if name in ranges else peak
    return ranges


def _smooth(model, products: list, ranges: dict[str, np.ndarray]) -> None:
    """x @ W -> (x * 1/s) @ (s W) for each product, one Mul per activation shared by its products."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    inserted = {}
    for act in sorted({n.input[0] for n in products}):
        users = [n for n in products if n.input[0] == act]
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in users]  # (D, out) each
        w_peak = np.max(np.stack([np.abs(w).max(axis=1) for w in weights]), axis=0)  # (D,)
        s = np.clip(np.maximum(ranges[act], 1e-5) ** ALPHA / np.maximum(w_peak, 1e-5) ** (1 - ALPHA), 1e-2, 1e2)
        name = f"{act}/smooth"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), f"{name}/inv_scale"))
        inserted[act] = helper.make_node("Mul", [act, f"{name}/inv_scale"], [name], name=f"{name}/Mul")
        for node, w in zip(users, weights):
            inits[node.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), node.input[1]))
            node.input[0] = name
    ordered = []
    for node in model.graph.node:  # each Mul right after what produces its input: the graph stays sorted
        ordered.append(node)
        ordered.extend(inserted.pop(out) for out in node.output if out in inserted)
    if inserted:
        raise QuantizeError("cannot smooth a graph input directly; re-export the package")
    del model.graph.node[:]
    model.graph.node.extend(ordered)


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


@contextlib.contextmanager
def _quiet():
    """quantize_dynamic logs a pre-processing hint on the root logger and warns per node: not the user's concern."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(None):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def quantize_embedding(package_dir: str | Path, scheme: str, *, force: bool = False, evaluate: bool = True,
                       progress: Progress | None = None) -> EmbeddingQuantizeResult:
    """Add an int8 variant to an embedding package (fp32 base only read; the manifest written last)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ..runtime.embed import embedding_tokenizer
    from ..runtime.model import load_tokenizer

    root = Path(package_dir)
    manifest = read_manifest(root)
    if scheme != "int8":
        raise QuantizeError(f"embedding packages take --scheme int8 only (smoothed dynamic int8), not {scheme!r}")
    if "fp32" not in manifest.variants:
        raise QuantizeError(f"{root} has no fp32 variant to quantize from; re-export it")
    if "int8" in manifest.variants and not force:
        raise QuantizeError(f"{root} already has an int8 variant; pass --force (force=True) to replace it")
    start = time.perf_counter()
    base_path = safe_path(root, manifest.variants["fp32"].file)
    final = safe_path(root, "onnx/model_int8.onnx")
    if progress:
        progress("quantizing (smoothing, then dynamic int8)...")
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=root) as scratch:
        model = load_onnx(base_path)
        products, after_gelu = _targets(model)
        tokenizer = embedding_tokenizer(load_tokenizer(root, manifest), manifest.embedding)
        _smooth(model, products, _activation_ranges(model, sorted({n.input[0] for n in products}), tokenizer))
        smoothed = Path(scratch) / "smoothed.onnx"
        save_onnx(model, smoothed)
        del model
        raw = Path(scratch) / "quantized.onnx"
        with _quiet():
            quantize_dynamic(str(smoothed), str(raw), weight_type=QuantType.QInt8, per_channel=True,
                             nodes_to_exclude=after_gelu,
                             extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
        model = onnx.load(str(raw))
        replaced = {op: sum(n.op_type == op for n in model.graph.node) for op in ("QAttention", "MatMulInteger",
                                                                        "QEmbedLayerNormalization")}
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
    method = {"quantizer": "onnxruntime quantize_dynamic after smoothing", "operator": "QAttention + MatMulInteger",
              "weights": "int8 per channel", "activations": "uint8, one scale per call", "smoothing_alpha": ALPHA,
              "smoothed": len(products), "quantized": replaced, "kept_fp32": after_gelu,
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

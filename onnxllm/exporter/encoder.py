"""export_embedding(): an embedding model -> a verified onnxllm package of kind "embedding".

Why torch.onnx and not our own graph builder (exporter/graph.py, which the decoders use): an encoder
is a single pass with no KV cache to lay out, so transformers' own modeling code traced by torch.onnx
is exact for every family it implements, and onnxruntime's transformer optimizer then fuses the
BERT-shaped graph into the kernels ORT ships for it:

    Gather(word) + Gather(pos) + Gather(type) + LayerNorm  -> EmbedLayerNormalization
    MatMul(q|k|v) + Softmax(QK^T / sqrt(d) + mask) @ V      -> Attention (one packed QKV weight)
    Add(residual) + LayerNorm                               -> SkipLayerNormalization
    Add(bias) + Gelu                                        -> BiasGelu

Pooling (mean over the attention mask, CLS, or last token) is traced into the graph, so the package
outputs one vector per text; L2 normalization stays in the runtime, where `normalize=` can turn it off.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ExportError, ModelNotFoundError, OnnxLLMError, UnsupportedModelError
from ..package import (FORMAT_VERSION, Architecture, EmbeddingSpec, IOSpec, KVCacheSpec, Manifest, Variant,
                       onnx_bytes, save_onnx, sha256_file, staging_dir, write_manifest)
from ..version import __version__
from .embedding_source import FAMILIES, EmbeddingFamily, EmbeddingSource, SentenceConfig, read_sentence_config, unpack

Progress = Callable[[str], None]
TOLERANCE = 1e-4  # fp32 ONNX vs PyTorch, largest |difference| of a pooled vector entry
_SENTENCE_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


@dataclass(frozen=True)
class EmbeddingExportOptions:
    verify: bool = True
    force: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False


def _pooled_module(model, pooling: str):
    """transformers' base model + the pooling, as one traceable module: (ids, mask) -> (B, D)."""
    import torch

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, D)
            if pooling == "cls":
                return hidden[:, 0]
            if pooling == "lasttoken":  # right padding: the last real token sits at sum(mask) - 1
                last = attention_mask.sum(dim=1) - 1  # (B,)
                return hidden[torch.arange(hidden.shape[0]), last]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    return Pooled().eval()


def reference_embeddings(model, pooling: str, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The PyTorch model's pooled vectors (not normalized): what the graph must reproduce."""
    import torch

    with torch.no_grad():
        out = _pooled_module(model, pooling)(torch.from_numpy(ids), torch.from_numpy(mask))
    return out.float().numpy()


def _trace(model, pooling: str, path: Path) -> None:
    import torch

    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 0, 0, 0]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes we keep dynamic
        # The TorchScript exporter (dynamo=False): its graphs are the ones ORT's fusion patterns match.
        torch.onnx.export(
            _pooled_module(model, pooling), (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
            output_names=["sentence_embedding"], opset_version=17, dynamo=False,
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "sentence_embedding": {0: "batch"}},
        )


def _fuse(path: Path, family: EmbeddingFamily, config) -> tuple[object, dict]:
    """ORT's transformer optimizer on the traced graph; returns the model and how many ops it fused."""
    import onnx

    if family.fuse_as is None:
        return onnx.load(str(path)), {}
    from onnxruntime.transformers import optimizer

    with contextlib.redirect_stdout(None), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = optimizer.optimize_model(str(path), model_type=family.fuse_as, num_heads=config.num_attention_heads,
                                         hidden_size=config.hidden_size, opt_level=0)
    stats = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
    model = fused.model
    # The fused ops live in ORT's contrib domain; OnnxModel.save would declare it, we save ourselves.
    if any(n.domain == "com.microsoft" for n in model.graph.node) and not any(
            o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.add(domain="com.microsoft", version=1)
    return model, stats


def _verify(onnx_path: Path, model, pooling: str, vocab: int, pad_id: int, seed: int = 0) -> float:
    """Largest |ONNX - PyTorch| over a padded batch of random texts of different lengths."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    lengths = [13, 5, 9, 1]
    ids = rng.integers(3, vocab, size=(len(lengths), max(lengths)), dtype=np.int64)
    mask = (np.arange(max(lengths))[None] < np.array(lengths)[:, None]).astype(np.int64)
    ids[mask == 0] = pad_id
    got = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    return float(np.abs(got - reference_embeddings(model, pooling, ids, mask)).max())


def _max_tokens(config, tok, family: EmbeddingFamily, sentence: SentenceConfig) -> int:
    limits = [int(getattr(config, "max_position_embeddings", 512))]
    if family.position_offset:
        limits[0] -= int(getattr(config, "pad_token_id", 1) or 0) + 1
    if sentence.max_seq_length:
        limits.append(sentence.max_seq_length)
    model_max = getattr(tok, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 1_000_000:
        limits.append(model_max)
    return min(limits)


def _load(folder: Path, options: EmbeddingExportOptions):
    from transformers import AutoModel, AutoTokenizer

    # eager attention: the traced softmax(QK^T) pattern is what the Attention fusion recognizes.
    model = AutoModel.from_pretrained(str(folder), dtype="float32", attn_implementation="eager",
                                      trust_remote_code=options.trust_remote_code,
                                      use_safetensors=not options.allow_pickle).eval()
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=options.trust_remote_code)
    if not getattr(tok, "is_fast", False):
        raise ExportError(f"{folder} has no fast tokenizer (tokenizer.json) and it could not be converted")
    return model, tok


def _check_folder(folder: Path, options: EmbeddingExportOptions) -> None:
    if not any(folder.glob("*.safetensors")):
        if any(folder.glob("*.bin")) and not options.allow_pickle:
            raise UnsupportedModelError(
                f"{folder} has only pickle weights (.bin), which can run code when loaded; convert them to "
                "safetensors, or pass --allow-pickle (allow_pickle=True) if you trust this checkpoint"
            )
        if not any(folder.glob("*.bin")):
            raise ModelNotFoundError(f"{folder} has a config.json but no weights (*.safetensors)")


def _write_tokenizer(tok, folder: Path, out: Path) -> None:
    tok.save_pretrained(str(out))
    for extra in ("vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model", "tokenizer.model",
                  "chat_template.jinja"):
        with contextlib.suppress(FileNotFoundError):
            (out / extra).unlink()
    # Other tools (sentence-transformers, fastembed) read these beside the model: keep them as they came.
    for name in _SENTENCE_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)
    pooling_dir = folder / "1_Pooling"
    if (pooling_dir / "config.json").is_file():
        (out / "1_Pooling").mkdir(exist_ok=True)
        shutil.copyfile(pooling_dir / "config.json", out / "1_Pooling" / "config.json")


def _source_record(src: EmbeddingSource, folder: Path) -> dict:
    if src.kind == "zip":
        return {"kind": "zip", "name": src.name, "catalog": src.catalog, "file": src.path.name,
                "path": str(src.path.resolve()), "sha256": sha256_file(src.path)}
    digest = ",".join(sha256_file(f)[:16] for f in sorted(folder.glob("*.safetensors")))
    return {"kind": "hf", "name": src.name, "path": str(folder), "sha256_safetensors": digest}


def export_embedding(src: EmbeddingSource, out_dir: str | Path, *,
                     options: EmbeddingExportOptions = EmbeddingExportOptions(),
                     progress: Progress | None = None) -> Path:
    """Export an embedding source (see embedding_source.embedding_source) to a package at `out_dir`."""
    out_dir = Path(out_dir)
    timings: dict = {}

    @contextlib.contextmanager
    def step(name: str):
        if progress:
            progress(f"{name}...")
        start = time.perf_counter()
        yield
        timings[name] = round(time.perf_counter() - start, 2)

    with tempfile.TemporaryDirectory(prefix="onnxllm-embed-") as scratch:
        folder = unpack(src, Path(scratch))
        _check_folder(folder, options)
        with step("loading"):
            try:
                model, tok = _load(folder, options)
            except (OnnxLLMError, KeyboardInterrupt, MemoryError):
                raise
            except Exception as exc:  # transformers/safetensors raise many unrelated types on bad files
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                raise ExportError(f"cannot load {folder}: {type(exc).__name__}: {first}") from None
        config = model.config
        family = FAMILIES[config.model_type]
        sentence = read_sentence_config(folder, decoder=family.decoder)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        with staging_dir(out_dir, force=options.force) as tmp:
            onnx_file = "onnx/model.onnx"
            with step("tracing"):
                raw = Path(scratch) / "traced.onnx"
                _trace(model, sentence.pooling, raw)
            with step("fusing"):
                proto, fused = _fuse(raw, family, config)
                save_onnx(proto, tmp / onnx_file)
                del proto
            config.save_pretrained(str(tmp))
            _write_tokenizer(tok, folder, tmp)
            verification: dict = {"skipped": True}
            if options.verify:
                with step("verifying"):
                    diff = _verify(tmp / onnx_file, model, sentence.pooling, config.vocab_size, pad_id)
                verification = {"max_abs_diff": diff, "tolerance": TOLERANCE}
                if progress:
                    progress(f"verified: max |embedding diff| {diff:.2e}")
                if not diff <= TOLERANCE:
                    raise ExportError(f"verification failed: ONNX embeddings differ from PyTorch by {diff:.3g} "
                                      f"(tolerance {TOLERANCE}); no package was written")
            heads = config.num_attention_heads
            manifest = Manifest(
                format_version=FORMAT_VERSION,
                exporter_version=__version__,
                source={**_source_record(src, folder), "pooling_from": sentence.read_from},
                architecture=Architecture(
                    model_type=config.model_type, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                    num_layers=config.num_hidden_layers, num_heads=heads,
                    num_kv_heads=int(getattr(config, "num_key_value_heads", heads) or heads),
                    head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
                    intermediate_size=config.intermediate_size,
                    context_length=_max_tokens(config, tok, family, sentence),
                    parameters=sum(p.numel() for p in model.parameters()),
                ),
                io=IOSpec(),  # the decoder names; an embedding graph's I/O is in `embedding`
                kv_cache=KVCacheSpec(),
                variants={"fp32": Variant(file=onnx_file, scheme="fp32", dtype="float32",
                                          bytes=onnx_bytes(tmp / onnx_file),
                                          method={"exporter": "torch.onnx + onnxruntime transformer optimizer",
                                                  "fused": fused, "timings_s": timings})},
                default_variant={"cpu": "fp32", "cuda": "fp32", "dml": "fp32"},
                eos_token_ids=[],
                bos_token_id=None,
                tokenizer="tokenizer.json",
                verification=verification,
                kind="embedding",
                embedding=EmbeddingSpec(pooling=sentence.pooling, normalize=sentence.normalize,
                                        dimension=config.hidden_size,
                                        max_tokens=_max_tokens(config, tok, family, sentence),
                                        pad_token_id=int(pad_id)),
            )
            write_manifest(tmp, manifest)
            if progress:
                progress("done")
    return out_dir


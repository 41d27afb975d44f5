"""export(): a trained causal LM -> a verified, self-describing ONNX model package.

Steps: resolve the source, load it in PyTorch (transformers), reduce it to uniform weights, build the
graph, save into a staging folder, verify against PyTorch, write the manifest, rename into place.

Memory: a safetensors checkpoint is streamed. The PyTorch model is built on the meta device (config and
module attributes, no weights), each weight is read from the mapped files when the graph builder writes
it to the external-data file, and the real model is loaded only to verify, then freed before the ONNX
session opens. Other sources (GGUF, remote code, pickle) load the model first and write the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..decoder_io import DecoderIO
from ..errors import ExportError, InvalidPackageError, OnnxLLMError
from ..methods import ExportMethod
from ..package import (FORMAT_VERSION, Architecture, KVCacheSpec, Manifest, Variant, check_can_create, onnx_bytes,
                       sha256_file, staging_dir, write_manifest, write_text_atomic)
from ..version import __version__
from .architectures import REGISTRY, DecoderWeights, describe_graph, extract_weights
from .graph import IO_NAMES, build_decoder
from .sources import Source, resolve_source
from .verify import verify_export

Progress = Callable[[str], None]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "float32"  # float32 | float16 (float16 is what the CUDA provider wants)
    verify: bool = True
    force: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False


@dataclass
class _Loaded:
    model: object  # a transformers PreTrainedModel; on the meta device when `state_dict` streams the weights
    eos_token_ids: list[int]
    bos_token_id: int | None
    add_bos_token: bool
    chat_template: str | None
    write_tokenizer: Callable[[Path], None]
    timings: dict = field(default_factory=dict)
    state_dict: object = None  # name -> float32 array, read on access (SafetensorsStateDict)
    reference: Callable[[], object] | None = None  # loads the real model for verification


@contextlib.contextmanager
def _reading(src: Source, *, writing: bool = False):
    """safetensors/gguf/transformers raise many unrelated types on bad files: one clear error instead.
    `writing`: the step also writes, so an OSError (a full disk) is ours to report as it is."""
    try:
        yield
    except (OnnxLLMError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:
        if writing and isinstance(exc, OSError):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ExportError(f"cannot load {src.path}: {type(exc).__name__}: {first}") from None


def _save_onnx(proto, path: Path) -> None:
    """The graph file; its weights are already in `path.name + ".data"` (written while building)."""
    import onnx

    onnx.save_model(proto, str(path))
    data = path.with_name(path.name + ".data")
    if data.exists():  # the data file gets the graph file's mode (the user's umask), as package.save_onnx does
        os.chmod(data, path.stat().st_mode & 0o777)


def _hand_over(loaded: _Loaded) -> Callable[[], object]:
    """A loader that gives away the one reference to the loaded model, so its caller can free it."""
    box = [loaded.model]
    loaded.model = None
    return box.pop


def _streamed_model(path: Path, opts: ExportOptions):
    """(meta-device model, state dict) when the checkpoint's safetensors hold every tensor the model names;
    None when they do not (renamed or fused tensors transformers converts on load): load it whole then."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from .safetensors_reader import SafetensorsStateDict

    if opts.trust_remote_code or not any(path.glob("*.safetensors")):
        return None
    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    sd = SafetensorsStateDict(path)
    needed = set(model.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        needed.discard("lm_head.weight")
    if not needed <= set(sd):
        return None
    with contextlib.suppress(OSError):
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    return model, sd


@contextlib.contextmanager
def _step(progress: Progress | None, name: str, timings: dict):
    if progress:
        progress(f"{name}...")
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 2)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _load_gguf(src: Source) -> _Loaded:
    from .gguf_model import load_gguf_model
    from .gguf_tokenizer import read_gguf_tokenizer, write_tokenizer_files

    info = read_gguf_tokenizer(src.path)
    # Our own reader (gguf_model.py): transformers' GGUF loader reads some families wrong (FACTS.md).
    model, _ = load_gguf_model(src.path, bos=info.bos_token_id, eos=info.eos_token_id)
    if info.pad_token_id is not None:
        model.config.pad_token_id = info.pad_token_id
    eos = _as_list(info.eos_token_id) + [i for i in info.end_of_turn_ids if i != info.eos_token_id]
    return _Loaded(model, eos, info.bos_token_id, info.add_bos_token, info.chat_template,
                   lambda out: write_tokenizer_files(info, out))


def _load_hf(src: Source, opts: ExportOptions) -> _Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    def load_model():
        return AutoModelForCausalLM.from_pretrained(
            str(src.path), dtype="float32", trust_remote_code=opts.trust_remote_code,
            use_safetensors=not opts.allow_pickle,
        ).eval()

    streamed = _streamed_model(src.path, opts)
    model, state_dict = streamed if streamed else (load_model(), None)
    tok = AutoTokenizer.from_pretrained(str(src.path), trust_remote_code=opts.trust_remote_code)
    if not getattr(tok, "is_fast", False):
        raise ExportError(f"{src.path} has no fast tokenizer (tokenizer.json) and it could not be converted")
    try:
        gen = GenerationConfig.from_pretrained(str(src.path))
        eos = _as_list(gen.eos_token_id) or _as_list(model.config.eos_token_id)
    except OSError:
        eos = _as_list(model.config.eos_token_id)
    template = tok.chat_template if isinstance(tok.chat_template, str) else None

    def write(out: Path) -> None:
        tok.save_pretrained(str(out))
        for extra in ("chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model"):
            with contextlib.suppress(FileNotFoundError):
                (out / extra).unlink()
        # transformers 5 no longer writes it; other tools (and older transformers) still read it.
        special = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, (str, list))}
        write_text_atomic(out / "special_tokens_map.json", json.dumps(special, indent=2, ensure_ascii=False))

    # What the tokenizer does, not what its config says: transformers 5 adds a BOS through the post-processor
    # (Gemma, Llama 2) while `add_bos_token` may be unset.
    probe = "a"
    with_special, plain = tok(probe)["input_ids"], tok(probe, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    add_bos = bos is not None and with_special[:1] == [bos] and plain[:1] != [bos]
    return _Loaded(model, eos, tok.bos_token_id, add_bos, template, write, state_dict=state_dict,
                   reference=load_model if state_dict is not None else None)


def _generation_defaults(model) -> dict:
    gen = getattr(model, "generation_config", None)
    sample = bool(getattr(gen, "do_sample", False))
    return {
        "temperature": float(getattr(gen, "temperature", 1.0) or 1.0) if sample else 0.0,
        "top_k": int(getattr(gen, "top_k", 0) or 0) if sample else 0,
        "top_p": float(getattr(gen, "top_p", 1.0) or 1.0) if sample else 1.0,
        "repetition_penalty": float(getattr(gen, "repetition_penalty", 1.0) or 1.0),
        "max_new_tokens": 256,
    }


def _genai_config(w: DecoderWeights, io: DecoderIO, loaded: _Loaded, onnx_file: str) -> dict:
    """Lets onnxruntime-genai's og.Model load the package as it is."""
    d = w.dims
    return {
        "model": {
            "bos_token_id": loaded.bos_token_id if loaded.bos_token_id is not None else 0,
            "context_length": d.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": onnx_file,
                "head_size": d.head_dim,
                "hidden_size": d.hidden_size,
                **io.genai_names(),
                "num_attention_heads": d.num_heads,
                "num_hidden_layers": d.num_layers,
                "num_key_value_heads": d.num_kv_heads,
            },
            "eos_token_id": loaded.eos_token_ids if len(loaded.eos_token_ids) != 1 else loaded.eos_token_ids[0],
            "pad_token_id": loaded.eos_token_ids[0] if loaded.eos_token_ids else 0,
            # genai picks its model class by type; its "gpt2" class expects a fused past tensor, while
            # our graph has the split key/value interface of its generic decoder classes.
            "type": REGISTRY[d.model_type].genai_type,
            "vocab_size": d.vocab_size,
        },
        "search": {"do_sample": False, "max_length": d.context_length, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0, "early_stopping": True, "length_penalty": 1.0,
                   "diversity_penalty": 0.0, "no_repeat_ngram_size": 0},
    }


def _source_record(src: Source) -> dict:
    if src.kind == "gguf":
        from .gguf_model import check_gguf_file

        return {"kind": "gguf", "name": src.name, "catalog": src.catalog, "file": src.path.name,
                "path": str(src.path.resolve()), "sha256": sha256_file(src.path),
                "tensor_types": check_gguf_file(src.path)}
    files = sorted(src.path.glob("*.safetensors"))
    digest = ",".join(sha256_file(f)[:16] for f in files)
    return {"kind": "hf", "name": src.name, "path": str(src.path), "sha256_safetensors": digest}


def _export_embedding(src, out_dir: Path, options: ExportOptions, progress: Progress | None) -> Path:
    from .encoder import EmbeddingExportOptions, export_embedding

    if options.dtype != "float32":
        raise ExportError("embedding models export in float32 only for now; drop --dtype float16")
    return export_embedding(src, out_dir, progress=progress, options=EmbeddingExportOptions(
        verify=options.verify, force=options.force, trust_remote_code=options.trust_remote_code,
        allow_pickle=options.allow_pickle))


def export(source: str | os.PathLike, out_dir: str | os.PathLike, *, options: ExportOptions = ExportOptions(),
           progress: Progress | None = None) -> Path:
    """Export `source` (HF folder, .gguf, catalog name or hub id) to a package at `out_dir`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not options.force:
        raise InvalidPackageError(f"{out_dir} already exists; pass --force (force=True) to overwrite it")
    if out_dir.exists() and out_dir.is_dir() and not (out_dir / "onnxllm.json").is_file() and any(out_dir.iterdir()):
        raise InvalidPackageError(
            f"{out_dir} exists and is not an onnxllm package; --force only replaces a package: choose another folder"
        )
    if options.dtype not in ("float32", "float16"):
        raise ExportError(f"dtype {options.dtype!r} is not supported; use float32 or float16")
    check_can_create(out_dir, fix="choose another output folder")  # before minutes of loading, not at save
    from .embedding_source import embedding_source

    if (embedding := embedding_source(source)) is not None:  # BERT-like encoders: exporter/encoder.py
        return _export_embedding(embedding, out_dir, options, progress)
    timings: dict = {}
    src = resolve_source(source, allow_pickle=options.allow_pickle)
    with _step(progress, "loading", timings), _reading(src):
        loaded = _load_gguf(src) if src.kind == "gguf" else _load_hf(src, options)
    model = loaded.model.eval()
    with _reading(src):
        weights = extract_weights(model, loaded.state_dict)
    d = weights.dims
    graph_notes = describe_graph(weights)
    if progress:
        for note in graph_notes["notes"]:
            progress(f"graph: {note}")
    kv_cache = KVCacheSpec(dtype=options.dtype, recompute_past_at=max((t.switch for t in weights.rope), default=0))
    io = DecoderIO(IO_NAMES, d.num_layers, d.num_kv_heads, d.head_dim, kv_cache)
    with staging_dir(out_dir, force=options.force) as tmp:
        onnx_file = "onnx/model.onnx" if options.dtype == "float32" else "onnx/model_fp16.onnx"
        graph_path = tmp / onnx_file
        graph_path.parent.mkdir(parents=True, exist_ok=True)
        with _step(progress, "building graph", timings), _reading(src, writing=True):
            with open(graph_path.with_name(graph_path.name + ".data"), "wb") as data:
                proto = build_decoder(weights, dtype=options.dtype, data=data, location=graph_path.name + ".data")
        with _step(progress, "saving", timings):
            _save_onnx(proto, graph_path)
            del proto
            model.config.save_pretrained(str(tmp))
            generation = _generation_defaults(model)
            write_text_atomic(tmp / "generation_config.json", json.dumps(
                {"eos_token_id": loaded.eos_token_ids, "bos_token_id": loaded.bos_token_id,
                 "do_sample": generation["temperature"] > 0, **{k: v for k, v in generation.items()}}, indent=2))
            loaded.write_tokenizer(tmp)
            if loaded.chat_template:
                write_text_atomic(tmp / "chat_template.jinja", loaded.chat_template)
            write_text_atomic(
                tmp / "genai_config.json", json.dumps(_genai_config(weights, io, loaded, onnx_file), indent=2)
            )
        parameters = sum(p.numel() for p in model.parameters())
        del weights, model  # the weights' state dict would keep a loaded model's tensors alive
        verification: dict = {"skipped": True}
        if options.verify:
            with _step(progress, "verifying", timings):
                # Loaded once (streaming) or handed over, and freed before the ONNX session needs its memory.
                reference = loaded.reference or _hand_over(loaded)
                report = verify_export(tmp / onnx_file, reference, io, vocab_size=d.vocab_size,
                                       dtype=options.dtype)
            verification = {
                "max_abs_diff": report.max_abs_diff,
                "max_abs_diff_with_past": report.max_abs_diff_with_past,
                "tolerance": report.tolerance,
                "prompts": report.prompts,
            }
            if progress:
                progress(f"verified: max |logit diff| {report.max_abs_diff:.2e} "
                         f"(with past {report.max_abs_diff_with_past:.2e})")
            if not report.ok:
                worst = max(report.max_abs_diff, report.max_abs_diff_with_past)
                raise ExportError(
                    f"verification failed: ONNX logits differ from PyTorch by {worst:.3g} "
                    f"(tolerance {report.tolerance}); no package was written. Re-run with --no-verify to keep it anyway"
                )
        scheme = "fp32" if options.dtype == "float32" else "fp16"
        variant = Variant(file=onnx_file, scheme=scheme, dtype=options.dtype, bytes=onnx_bytes(tmp / onnx_file),
                          method=ExportMethod(exporter="onnxllm graph builder", timings_s=timings, graph=graph_notes))
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            exporter_version=__version__,
            source=_source_record(src),
            architecture=Architecture(
                model_type=d.model_type, vocab_size=d.vocab_size, hidden_size=d.hidden_size, num_layers=d.num_layers,
                num_heads=d.num_heads, num_kv_heads=d.num_kv_heads, head_dim=d.head_dim,
                intermediate_size=d.intermediate_size, context_length=d.context_length,
                parameters=parameters,
            ),
            io=IO_NAMES,
            kv_cache=kv_cache,
            variants={scheme: variant},
            default_variant={"cpu": scheme, "cuda": scheme, "dml": scheme},
            eos_token_ids=loaded.eos_token_ids,
            bos_token_id=loaded.bos_token_id,
            add_bos_token=loaded.add_bos_token,
            chat_template="chat_template.jinja" if loaded.chat_template else None,
            generation=generation,
            verification=verification,
        )
        write_manifest(tmp, manifest)
        if progress:
            progress("done")
    return out_dir

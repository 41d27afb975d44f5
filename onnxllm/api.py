"""The public functions behind `onnxllm.*` and every CLI command (the CLI imports this module only).

Runtime calls import nothing heavy; export and quantize import torch/transformers only when called.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Literal, Sequence

from .bench import BenchOptions, run_bench
from .cache import CachedModel, cached_models, find_cached, remove_cached
from .bench import format_bench as format_bench
from .catalog import CATALOG, cache_dir, is_catalog_name
from .errors import ModelNotFoundError, UnsupportedModelError
from .package import check_can_create, exclusive, find_package_root, read_manifest
from .runtime.embed import EmbeddingModel, Embeddings, SearchHit, no_embedding_mode
from .runtime.generate import Chunk, GenerationConfig, GenerationResult
from .runtime.model import LoadOptions, Model, load_package
from .runtime.options import GenerationOptions

if TYPE_CHECKING:  # the quantizer, bench and doctor load only when called
    from typing_extensions import Unpack

    from .doctor import DoctorLine
    from .quantize.quality import QualityReport
    from .quantize.quantize import QuantizeOptions, QuantizeResult

Progress = Callable[[str], None]
_LOAD = LoadOptions()  # the defaults of `load`'s keywords, from their one source


def _require_exporter(what: str) -> None:
    import importlib.util

    missing = [m for m in ("torch", "transformers", "onnx") if importlib.util.find_spec(m) is None]
    if missing:
        raise UnsupportedModelError(
            f"{what} needs the exporter's dependencies ({', '.join(missing)} missing); install them with: "
            "pip install torch==2.13.0 && pip install 'onnxllm[export]'"
        )


def pull(name: str, *, progress: Progress | None = None) -> Path:
    """The cached package of a catalog model, exporting and quantizing it on first use (like `ollama pull`)."""
    if not is_catalog_name(name):
        raise ModelNotFoundError(f"{name!r} is not in the catalog; known: {', '.join(CATALOG)}")
    entry = CATALOG[name.lower()]
    target = cache_dir() / entry.name
    check_can_create(target, fix="set $ONNXLLM_CACHE to a folder you can write to")
    # Two first runs at once (two terminals, two app instances) must not export into one folder.
    with exclusive(cache_dir() / f".{entry.name}.lock"):
        wanted = {entry.default_variant, entry.fallback_variant} - {None}
        if (target / "onnxllm.json").is_file():
            if wanted & set(read_manifest(target).variants):  # a cache made by an older release is kept
                return target
        else:
            _require_exporter(f"the first run of {entry.name!r}")
            export(entry.name, target, force=True, progress=progress)
        result = quantize(target, entry.default_variant, progress=progress)
        if entry.fallback_variant and not result.meets_targets:
            quantize(target, entry.fallback_variant, progress=progress)
    return target


def resolve_model(model: str | os.PathLike, *, progress: Progress | None = None) -> Path:
    """The folder or .onnx path `model` names; a catalog name is pulled (exported on first use)."""
    text = str(model)
    if is_catalog_name(text) and not Path(text).exists():
        return pull(text, progress=progress)
    path = Path(text).expanduser()
    if not path.exists() and (cached := find_cached(cache_dir(), text)) is not None:
        return cached  # a name `onnxllm list` shows
    if not path.exists():
        raise ModelNotFoundError(
            f"{text} does not exist; give a model package folder, a path to its model.onnx, or a catalog name "
            f"({', '.join(CATALOG)})"
        )
    return path


def resolve_served_model(model: str | os.PathLike, *, progress: Progress | None = None) -> tuple[str, Path]:
    """(name, package folder) for a server: a catalog name keeps its name, a folder is named after itself."""
    text = str(model)
    root = find_package_root(resolve_model(model, progress=progress))
    read_manifest(root)  # a broken package fails now, at start, not on its first request
    name = CATALOG[text.lower()].name if is_catalog_name(text) and not Path(text).exists() else root.name
    return name, root


def list_models() -> list[CachedModel]:
    """The packages in the cache folder (name, size, variants, family, source), like `ollama list`."""
    return cached_models(cache_dir())


def remove_model(name: str) -> CachedModel:
    """Delete a package from the cache folder by the name `list_models` gives (never a path)."""
    return remove_cached(cache_dir(), name)


def load(model: str | os.PathLike, device: str = _LOAD.device, variant: str | None = None, *,
         threads: int | None = None, context: int | None = None, kv_mode: str = _LOAD.kv_mode,
         io_binding: bool = _LOAD.io_binding, prefill_chunk: int = _LOAD.prefill_chunk,
         progress: Progress | None = None) -> Model | EmbeddingModel:
    """Load a package folder, a path to its .onnx, or a catalog name (exported on first use).

    Folders made by onnxruntime-genai's builder, optimum or transformers.js (onnx/model_*.onnx) load too;
    `variant` picks one of their files (`onnxllm info` lists them).

    An embedding package loads as an EmbeddingModel (`embed`, `search`); a decoder as a Model.

    `prefill_chunk`: prompts longer than this are fed this many tokens per pass (0: all at once)."""
    path = resolve_model(model, progress=progress)
    return load_package(path, LoadOptions(device=device, variant=variant, threads=threads, context=context,
                                          kv_mode=kv_mode, io_binding=io_binding, prefill_chunk=prefill_chunk))


def import_folder(folder: str | os.PathLike, out: str | os.PathLike, *, copy: bool = False,
                  force: bool = False) -> Path:
    """An onnxllm package at `out` from a folder onnxruntime-genai, optimum or transformers.js made.

    The graphs and weights are hard-linked (or copied, `copy=True`); the folder itself is never modified."""
    from .readers.importer import import_folder as _import

    return _import(folder, out, copy=copy, force=force)


def generate(model: Model | str | os.PathLike, prompt, config: GenerationConfig | None = None,
             **overrides: Unpack[GenerationOptions]) -> GenerationResult:
    """One-shot generation; `model` may be a loaded Model or anything `load` accepts.

    `config` replaces the package's defaults; `overrides` (GenerationConfig's fields) change single ones."""
    return (model if isinstance(model, Model) else load(model)).generate(prompt, config, **overrides)


def stream(model: Model | str | os.PathLike, prompt, config: GenerationConfig | None = None,
           **overrides: Unpack[GenerationOptions]) -> Iterator[Chunk]:
    """Chunks as they are generated (see Model.stream); `model` as for `generate`."""
    return (model if isinstance(model, Model) else load(model)).stream(prompt, config, **overrides)


def info(model: str | os.PathLike, *, progress: Progress | None = None) -> dict:
    """What a package holds (architecture, context, variants with size, how made and quality, EOS ids)."""
    from .readers import open_folder
    from .runtime.info import package_info

    folder = open_folder(resolve_model(model, progress=progress))  # a package, or a folder another tool made
    return package_info(folder.root, folder.manifest, layout=folder.layout, skipped=folder.skipped)


def format_info(data: dict) -> str:
    """`info`'s result for people, as `onnxllm info` prints it."""
    from .runtime.info import format_info as _format

    return _format(data)


def evaluate(package: str | os.PathLike, variant: str | None = None, *, text: str | None = None,
             tokens: int = 4096) -> list[QualityReport]:
    """Perplexity, KL, top-1 and greedy agreement of a package's variants against its base (fp32, else fp16),
    along the prefill, one-token decode and draft passes generation makes (quantize/fidelity.py).

    `variant` None: every quantized variant (the base alone when there is none); `text` None: the fidelity
    corpus (prose, verse, dialogue, code, chat transcripts), `tokens` of it in all.
    Each report is also saved into the package's quality.json (a folder another tool made is only read)."""
    from .quantize.quality import base_variant, evaluate as _evaluate
    from .readers import open_folder

    manifest = open_folder(package).manifest
    base = base_variant(manifest)
    quantized = [v for v in manifest.variants if v != base]
    names = [variant] if variant else quantized or [base or next(iter(manifest.variants))]
    return [_evaluate(package, name, text=text, max_tokens=tokens) for name in names]


def format_quality(report: QualityReport) -> str:
    """One of `evaluate`'s reports for people, as `onnxllm eval` prints it."""
    from .quantize.quality import format_report

    return format_report(report)


def bench(model: str | os.PathLike, options: BenchOptions | None = None, *, progress: Progress | None = None) -> dict:
    """Prefill/decode tokens/s, time to first token, load time and peak memory, with machine and versions."""
    options = options or BenchOptions()
    start = time.perf_counter()
    m = load(model, device=options.device, variant=options.variant, threads=options.threads,
             prefill_chunk=options.prefill_chunk, progress=progress)
    return run_bench(m, options, load_s=time.perf_counter() - start, progress=progress)


def doctor() -> list[DoctorLine]:
    """What is installed, which execution providers work here, what to fix."""
    from .doctor import run_doctor

    return run_doctor()


def format_doctor(lines: list[DoctorLine]) -> str:
    from .doctor import format_report

    return format_report(lines)


def supported_architectures() -> list[str]:
    """The Hugging Face `model_type` values `export` accepts (docs/ARCHITECTURES.md: how to add one)."""
    from .exporter.architectures import REGISTRY

    return sorted(REGISTRY)


def export(source: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32", verify: bool = True,
           force: bool = False, trust_remote_code: bool = False, allow_pickle: bool = False,
           progress: Progress | None = None) -> Path:
    """Export a HF checkpoint folder, .gguf file, catalog name or hub id to a verified package."""
    _require_exporter("export")
    from .exporter.export import ExportOptions, export as _export

    opts = ExportOptions(dtype=dtype, verify=verify, force=force, trust_remote_code=trust_remote_code,
                         allow_pickle=allow_pickle)
    return _export(source, out_dir, options=opts, progress=progress)


def quantize(package: str | os.PathLike, scheme: str, options: QuantizeOptions | None = None, *,
             block_size: int | None = None, symmetric: bool | None = None, exclude: Iterable[str] | None = None,
             accuracy_level: int | None = None, evaluate: bool | None = None, force: bool | None = None,
             from_gguf: bool | Literal["auto"] | None = None, lm_head_bits: int | None = None,
             embed_bits: int | None = None, eval_tokens: int | None = None,
             progress: Progress | None = None) -> QuantizeResult:
    """Add an int8, int4, int8-dynamic or gguf variant to a package and measure what it costs in quality.

    `options` (QuantizeOptions, its defaults when None) with the keywords given (not None) changed;
    the fields are described there."""
    from .quantize.quantize import QuantizeOptions, quantize as _quantize

    given = {"block_size": block_size, "symmetric": symmetric, "accuracy_level": accuracy_level,
             "evaluate": evaluate, "force": force, "from_gguf": from_gguf, "lm_head_bits": lm_head_bits,
             "embed_bits": embed_bits, "eval_tokens": eval_tokens,
             "exclude": None if exclude is None else tuple(exclude)}
    opts = dataclasses.replace(options or QuantizeOptions(), **{k: v for k, v in given.items() if v is not None})
    if not Path(package).is_dir():
        return _quantize(package, scheme, opts, progress=progress)  # raises its clear error; never makes the folder
    with exclusive(Path(package) / ".onnxllm.lock"):  # the manifest is read at the start, written at the end
        if read_manifest(package).kind == "embedding":
            from .quantize.embedding import quantize_embedding

            return quantize_embedding(package, scheme, force=opts.force, evaluate=opts.evaluate, progress=progress)
        return _quantize(package, scheme, opts, progress=progress)


def embed(model: "Model | EmbeddingModel | str | os.PathLike", texts: str | Sequence[str], *, batch_size: int = 32,
          normalize: bool | None = None, truncate: bool = True) -> Embeddings:
    """Vectors for `texts`, float32 (N, D); `model` may be a loaded model or anything `load` accepts.

    `result.truncated` lists the texts cut to the model's limit (truncate=False refuses them instead)."""
    loaded = model if isinstance(model, (Model, EmbeddingModel)) else load(model)
    return loaded.embed(texts, batch_size=batch_size, normalize=normalize, truncate=truncate)


def search(model: "Model | EmbeddingModel | str | os.PathLike", query: str, corpus: Sequence[str], *, top_k: int = 5,
           batch_size: int = 32) -> list[SearchHit]:
    """The `top_k` texts of `corpus` most similar to `query` (cosine of their embeddings), best first."""
    loaded = model if isinstance(model, (Model, EmbeddingModel)) else load(model)
    if not isinstance(loaded, EmbeddingModel):
        raise no_embedding_mode(loaded.root)
    return loaded.search(query, corpus, top_k=top_k, batch_size=batch_size)

"""The public functions behind `onnxllm.*` and every CLI command.

Runtime calls import nothing heavy; export and quantize import torch/transformers only when called.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .cache import CachedModel, cached_models, find_cached, remove_cached
from .catalog import CATALOG, is_catalog_name
from .errors import ModelNotFoundError, UnsupportedModelError
from .package import check_can_create, exclusive, read_manifest
from .runtime.embed import EmbeddingModel, Embeddings, SearchHit, no_embedding_mode
from .runtime.generate import Chunk, GenerationResult
from .runtime.model import LoadOptions, Model, load_package

Progress = Callable[[str], None]


def cache_dir() -> Path:
    """Where catalog models are exported to: $ONNXLLM_CACHE or ~/.cache/onnxllm."""
    from .doctor import cache_dir as _cache_dir

    return _cache_dir()


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
    from .package import find_package_root

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


def load(model: str | os.PathLike, device: str = "auto", variant: str | None = None, *, threads: int | None = None,
         context: int | None = None, kv_mode: str = "shared", io_binding: bool = True, prefill_chunk: int = 256,
         progress: Progress | None = None) -> Model | EmbeddingModel:
    """Load a package folder, a path to its .onnx, or a catalog name (exported on first use).

    An embedding package loads as an EmbeddingModel (`embed`, `search`); a decoder as a Model.

    `prefill_chunk`: prompts longer than this are fed this many tokens per pass (0: all at once)."""
    path = resolve_model(model, progress=progress)
    return load_package(path, LoadOptions(device=device, variant=variant, threads=threads, context=context,
                                          kv_mode=kv_mode, io_binding=io_binding, prefill_chunk=prefill_chunk))


def generate(model: Model | str | os.PathLike, prompt, **options) -> GenerationResult:
    """One-shot generation; `model` may be a loaded Model or anything `load` accepts."""
    return (model if isinstance(model, Model) else load(model)).generate(prompt, **options)


def stream(model: Model | str | os.PathLike, prompt, **options) -> Iterator[Chunk]:
    return (model if isinstance(model, Model) else load(model)).stream(prompt, **options)


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


def quantize(package: str | os.PathLike, scheme: str, **options):
    """Add an int8 or int4 variant to a package (see onnxllm.quantize.quantize for options)."""
    from .quantize.quantize import quantize as _quantize

    if not Path(package).is_dir():
        return _quantize(package, scheme, **options)  # raises its clear error; never create the folder
    with exclusive(Path(package) / ".onnxllm.lock"):  # the manifest is read at the start, written at the end
        if read_manifest(package).kind == "embedding":
            from .quantize.embedding import quantize_embedding

            return quantize_embedding(package, scheme, force=options.get("force", False),
                                      evaluate=options.get("evaluate", True), progress=options.get("progress"))
        return _quantize(package, scheme, **options)


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

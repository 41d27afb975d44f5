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
# GGUF tensor types the exporter reads (by gguf.GGMLQuantizationType name).
SUPPORTED_GGUF_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}


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
    """Reject a corrupt GGUF, or one with tensor types the exporter does not read, before loading it."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, struct.error, IndexError... on garbage
        raise InvalidPackageError(f"{path} is not a valid GGUF file ({type(exc).__name__}: {exc})") from None
    kinds = {gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors}
    unsupported = sorted(kinds - SUPPORTED_GGUF_TYPES)
    if unsupported:
        raise UnsupportedModelError(
            f"{path.name} uses GGUF tensor types {', '.join(unsupported)}, which the exporter does not handle; "
            f"supported: {', '.join(sorted(SUPPORTED_GGUF_TYPES))}"
        )
    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field else "unknown"
    check_supported(arch)


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

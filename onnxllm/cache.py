"""The packages in the cache folder, like ollama's `list` and `rm`: what is there, and removing one.

A cached model is a direct child folder holding an onnxllm.json; its folder name is the name that
`onnxllm run`, `onnxllm serve` and the server's /v1/models use.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidPackageError, ModelNotFoundError
from .package import MANIFEST, exclusive, read_manifest

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class CachedModel:
    name: str
    path: Path
    bytes: int
    variants: tuple[str, ...]
    family: str  # the architecture's model_type
    source: str  # where the weights came from: "gguf SmolLM2-135M-Instruct.Q4_1.gguf", "hf org/name"
    modified: float  # seconds since the epoch, of the manifest

    def as_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), "bytes": self.bytes, "variants": list(self.variants),
                "family": self.family, "source": self.source, "modified": self.modified}


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def _describe(folder: Path) -> CachedModel:
    manifest = read_manifest(folder)
    src = manifest.source
    what = src.get("file") if src.get("kind") == "gguf" else src.get("name")
    return CachedModel(name=folder.name, path=folder, bytes=_size(folder), variants=tuple(manifest.variants),
                       family=manifest.architecture.model_type, source=f"{src.get('kind', '?')} {what or '?'}",
                       modified=(folder / MANIFEST).stat().st_mtime)


def cached_models(root: Path) -> list[CachedModel]:
    """Every package in `root`, by name; folders that are not valid packages are left out (and left alone)."""
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(root.iterdir()):
        if folder.is_dir() and not folder.name.startswith(".") and (folder / MANIFEST).is_file():
            try:
                out.append(_describe(folder))
            except InvalidPackageError:
                continue  # half-written or from a newer release: not ours to list or touch
    return out


def find_cached(root: Path, name: str) -> Path | None:
    """The folder of cached model `name`, or None. Names are plain folder names: never a path."""
    if not _NAME.match(name):
        return None
    folder = root / name
    return folder if (folder / MANIFEST).is_file() else None


def remove_cached(root: Path, name: str) -> CachedModel:
    """Delete cached model `name`. It is renamed away first, so no reader ever sees half a package, and the
    removal holds the same lock as `pull`, so it never races a first-run export of the same name."""
    folder = find_cached(root, name)
    if folder is None:
        known = ", ".join(m.name for m in cached_models(root)) or "none"
        raise ModelNotFoundError(f"{name!r} is not in the cache folder {root} (cached: {known}); see `onnxllm list`")
    with exclusive(root / f".{name}.lock"):
        model = _describe(folder)
        trash = root / f".{name}.removing"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return model

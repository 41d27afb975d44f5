"""Read any model folder into one description (a Manifest): ours, onnxruntime-genai's, optimum's, transformers.js'.

One reader per layout, each small, each returning the same typed structure; what reads the result (the
runtime, `info`, `eval`, `import`) never asks which tool made the folder. Which reader applies is decided by
the folder's own description file: onnxllm.json, else genai_config.json, else config.json beside .onnx files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidPackageError
from ..package import MANIFEST, Manifest, read_manifest


@dataclass(frozen=True)
class ModelFolder:
    root: Path
    manifest: Manifest
    layout: str  # onnxllm | genai | optimum | transformers.js
    variant: str | None = None  # the variant whose .onnx the path named, if it named one
    skipped: dict = field(default_factory=dict)  # file -> why it cannot run


def _root_of(path: Path) -> tuple[Path, str]:
    start = path if path.is_dir() else path.parent
    for candidate in (start, *start.parents[:2]):
        if (candidate / MANIFEST).is_file():
            return candidate, "onnxllm"
    for candidate in (start, *start.parents[:1]):
        if (candidate / "genai_config.json").is_file():
            return candidate, "genai"
        if (candidate / "config.json").is_file() and (any(candidate.glob("*.onnx")) or
                                                     any((candidate / "onnx").glob("*.onnx"))):
            return candidate, "hf"
    what = "folder" if path.is_dir() else "file's folder"
    raise InvalidPackageError(
        f"{path}: the {what} has no {MANIFEST}, genai_config.json, or config.json beside .onnx files: it is not an "
        "onnxllm package nor a folder onnxllm can read; export one with `onnxllm export SOURCE -o FOLDER`"
    )


def open_folder(path: str | os.PathLike) -> ModelFolder:
    """The description of the model at `path`: a folder, or a .onnx file inside one."""
    p = Path(path)
    if not p.exists():
        raise InvalidPackageError(f"{path} does not exist")
    if p.is_file() and p.suffix != ".onnx":
        raise InvalidPackageError(f"{path} is not a .onnx file; point at a model folder or its .onnx file")
    root, layout = _root_of(p)
    if layout == "onnxllm":
        manifest = read_manifest(root)
        return ModelFolder(root, manifest, "onnxllm", _variant_for(root, manifest, p))
    if layout == "genai":
        from .genai import read_genai

        manifest = read_genai(root)
        return ModelFolder(root, manifest, manifest.format, _variant_for(root, manifest, p))
    from .hf import read_hf

    manifest, skipped = read_hf(root, only=p if p.is_file() else None)
    return ModelFolder(root, manifest, manifest.format, _variant_for(root, manifest, p), skipped)


def _variant_for(root: Path, manifest: Manifest, path: Path) -> str | None:
    if not path.is_file() or manifest.format == "onnxllm":
        return None  # a package's .onnx path means the package, with its default variant (as before)
    target = path.resolve()
    for name, v in manifest.variants.items():
        if (root / v.file).resolve() == target:
            return name
    raise InvalidPackageError(f"{path} is not a graph the folder's genai_config.json names; point at the folder")

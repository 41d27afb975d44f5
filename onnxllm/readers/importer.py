"""`onnxllm import FOLDER -o PACKAGE`: an onnxllm package from a foreign folder, without re-exporting.

The graphs and their external data keep their paths relative to the folder (external data is found relative to
its graph); each is hard-linked when the two folders share a file system, else copied (`copy=True`: always
copied). The original folder is only read. The manifest is what the folder's reader found.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

from ..errors import InvalidPackageError
from ..package import check_can_create, safe_path, staging_dir, write_manifest
from . import open_folder

_BESIDE = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "genai_config.json",
)


def _graph_files(root: Path, onnx_file: str) -> list[str]:
    """The graph and every external data file it names, relative to root."""
    import onnx

    graph = safe_path(root, onnx_file)
    model = onnx.load(str(graph), load_external_data=False)
    names = {onnx_file}
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                names.add(os.path.normpath(os.path.join(os.path.dirname(onnx_file), entry.value)))
    return sorted(names)


def _place(src: Path, dst: Path, copy: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not copy:
        try:
            os.link(src, dst)
            return
        except OSError:  # another file system, or links not allowed: copy instead
            pass
    shutil.copy2(src, dst)


def import_folder(folder: str | os.PathLike, out: str | os.PathLike, *, copy: bool = False,
                  force: bool = False) -> Path:
    """Write a package at `out` from the model folder `folder` (genai, optimum or transformers.js layout)."""
    source = open_folder(folder)
    if source.layout == "onnxllm":
        raise InvalidPackageError(f"{source.root} is already an onnxllm package; use it as it is (or copy the folder)")
    out = Path(out)
    check_can_create(out, fix="choose another output folder")
    files = sorted({f for v in source.manifest.variants.values() for f in _graph_files(source.root, v.file)})
    files += [f for f in _BESIDE if (source.root / f).is_file()]
    if source.manifest.chat_template and source.manifest.chat_template not in files:
        files.append(source.manifest.chat_template)
    with staging_dir(out, force=force) as tmp:
        for rel in files:
            _place(safe_path(source.root, rel), tmp / rel, copy)
        manifest = replace(source.manifest, format="onnxllm",
                           source={**source.manifest.source, "imported_from": source.layout, "linked": not copy})
        write_manifest(tmp, manifest)
    return out

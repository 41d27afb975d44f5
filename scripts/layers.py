"""Print the layer map: which onnxllm module imports which (top-level and in-function imports alike).

Run from the repository root: `python scripts/layers.py [package_dir]`. Reads the source with `ast`;
imports nothing of onnxllm, so it works on any checkout.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> set[str]:
    """The onnxllm modules `path` imports, as dotted names (a package's `from . import x` names x's module)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = root.name
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == top)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == top:
                target = node.module
            else:
                continue
            for alias in node.names:  # `from . import x` may import the submodule x
                sub = f"{target}.{alias.name}"
                found.add(sub if (root.parent / Path(*sub.split("."))).with_suffix(".py").is_file() else target)
    found.discard(name)
    return found


def layer_map(root: Path) -> dict[str, list[str]]:
    """Module -> the onnxllm modules it imports, both without the package prefix (the root is "onnxllm")."""
    def short(name: str) -> str:
        return name.removeprefix(root.name + ".")

    return {short(module_name(p, root)): sorted(short(d) for d in imports_of(p, root))
            for p in sorted(root.rglob("*.py"))}


# The floors, bottom up (STYLE.md): a module may import its own floor and those below, never above.
FLOORS = [
    ("errors", "version", "package", "decoder_io", "readers", "methods", "catalog", "cache"),
    ("runtime", "exporter"),
    ("quantize",),
    ("bench", "doctor"),
    ("api",),
    ("serve",),  # the HTTP front end, over the API
    ("onnxllm",),  # the package root: re-exports the API
    ("cli", "terminal"),  # the command line (terminal.py: its I/O): the API, and `serve` for its one command
]


def floor(module: str) -> int | None:
    """The floor of a module (its first dotted part decides), None for a module no floor names yet."""
    head = module.split(".")[0]
    return next((i for i, names in enumerate(FLOORS) if head in names), None)


def upward(layers: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs whose arrow points up a floor, or that involve a module with no floor."""
    def up(a: str, b: str) -> bool:
        fa, fb = floor(a), floor(b)
        return fa is None or fb is None or fb > fa

    return [(m, d) for m, deps in layers.items() for d in deps if up(m, d)]


def main(argv: list[str]) -> None:
    root = Path(argv[0] if argv else "onnxllm").resolve()
    layers = layer_map(root)
    for module, deps in layers.items():
        level = floor(module)
        print(f"{module:28} F{'?' if level is None else level} -> {', '.join(deps) or '-'}")
    bad = upward(layers)
    print("arrows pointing up: " + (", ".join(f"{a} -> {b}" for a, b in bad) if bad else "none"))


if __name__ == "__main__":
    main(sys.argv[1:])

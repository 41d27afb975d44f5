"""The floors hold: imports point down (scripts/layers.py), the CLI reaches only the API, defaults have one source."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _layers_script():
    spec = importlib.util.spec_from_file_location("layers", ROOT / "scripts" / "layers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_points_up_a_floor():
    layers = _layers_script()
    mapping = layers.layer_map(ROOT / "onnxllm")
    assert {"api", "cli", "runtime.model", "quantize.quantize", "version"} <= set(mapping)
    assert layers.upward(mapping) == []
    assert not [m for m, deps in mapping.items() if "onnxllm" in deps]  # nobody imports the package root
    assert not [m for m, deps in mapping.items() if "cli" in deps]


def test_cli_imports_the_api_only():
    """Besides the API: errors, the version, its terminal I/O and the server (a front end over the API)."""
    mapping = _layers_script().layer_map(ROOT / "onnxllm")
    assert set(mapping["cli"]) == {"api", "errors", "version", "serve", "terminal"}  # terminal: its own I/O half
    assert set(mapping["terminal"]) == {"errors"}


def test_the_script_prints_the_map():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "layers.py"), str(ROOT / "onnxllm")],
                         capture_output=True, text=True, check=True).stdout
    assert "cli" in out and "arrows pointing up: none" in out


def test_generation_options_are_generation_configs_fields():
    from onnxllm.runtime.generate import GenerationConfig
    from onnxllm.runtime.options import GenerationOptions

    assert set(GenerationOptions.__annotations__) == {f.name for f in fields(GenerationConfig)}


def test_each_default_has_one_source():
    from onnxllm.bench import BenchOptions
    from onnxllm.runtime.generate import GenerationConfig
    from onnxllm.runtime.model import LoadOptions
    from onnxllm.runtime.session import SessionConfig

    assert BenchOptions().prefill_chunk == LoadOptions().prefill_chunk == SessionConfig().prefill_chunk
    assert BenchOptions().draft_tokens == GenerationConfig().draft_tokens
    # No other line writes either number as a default of its own.
    literal = re.compile(r"(prefill[_-]chunk|draft[_-]tokens)\W[^\n]*(=|default\W+)(256|8)\b")
    for folder in ("onnxllm", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for line in path.read_text(encoding="utf-8").splitlines():
                if literal.search(line):
                    assert (path.name, line.strip()) in {("session.py", "prefill_chunk: int = 256"),
                                                         ("generate.py", "draft_tokens: int = 8")}, (path, line)

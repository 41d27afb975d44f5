"""Every command and code example in the README runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_gpt2_five_line_example(tiny_gpt2):
    code = next(c for c in PYTHON if "The quick brown fox" in c)
    assert len([line for line in code.strip().splitlines() if line.strip()]) == 4  # + the blank line: five
    out = _run(code.replace('"gpt2-package"', repr(str(tiny_gpt2))))
    import onnxllm

    assert out == onnxllm.load(tiny_gpt2).generate("The quick brown fox", max_tokens=50).text + "\n"


@pytest.mark.real
def test_streaming_and_chat_example(smollm2_package):
    code = next(c for c in PYTHON if "model.chat(" in c)
    out = _run(code.replace('"smollm2-135m-instruct"', repr(str(smollm2_package))))
    assert "tok/s" in out and "Paris" in out


def test_semantic_search_example(tmp_path):
    from _tiny_encoder import make_tiny_encoder

    import onnxllm

    pkg = onnxllm.export(make_tiny_encoder(tmp_path, "bert"), tmp_path / "pkg")
    code = next(c for c in PYTHON if "model.search(" in c)
    out = _run(code.replace('"all-minilm-l6-v2"', repr(str(pkg))))
    assert len(out.strip().splitlines()) == 2  # random weights: two hits, in whatever order


@pytest.mark.real
def test_semantic_search_example_real(minilm_package):
    code = next(c for c in PYTHON if "model.search(" in c)
    out = _run(code.replace('"all-minilm-l6-v2"', repr(str(minilm_package))))
    assert out.splitlines()[0].endswith("The flight to Lisbon leaves at 7:40 from gate B12")


def test_every_cli_command_in_readme_exists():
    usage = next(code for lang, code in BLOCKS if lang == "bash" and "onnxllm export" in code)
    commands = set(re.findall(r"^onnxllm (\w+)", usage, flags=re.M))
    assert commands == {"export", "quantize", "run", "chat", "info", "eval", "bench", "serve", "list", "rm", "import",
                        "embed", "search", "doctor"}
    out = subprocess.run([sys.executable, "-m", "onnxllm.cli", "--help"], capture_output=True, text=True).stdout
    for command in commands:
        assert re.search(rf"^\s+{command}\b", out, flags=re.M), command
        help_text = subprocess.run([sys.executable, "-m", "onnxllm.cli", command, "--help"], capture_output=True,
                                   text=True).stdout
        segment = re.search(rf"^onnxllm {command}\b(.*?)(?=^onnxllm |\Z)", usage, flags=re.M | re.S).group(1)
        for name in re.findall(r"--[a-z-]+", segment):
            assert name in help_text, (command, name)


def test_make_targets_in_readme_exist():
    makefile = (Path(__file__).parent.parent / "Makefile").read_text()
    for target in set(re.findall(r"make ([a-z-]+)", README)):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target

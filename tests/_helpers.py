"""Helpers tests share (no test file imports another): the CLI as a subprocess, a package with a chat template.

    from _helpers import ONNXLLM, cli, with_template
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ONNXLLM = [sys.executable, "-m", "onnxllm.cli"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def cli(*args, input=None, env=None, timeout=120) -> subprocess.CompletedProcess:
    """Run `onnxllm ARGS` as a user does: a subprocess, text stdin/stdout/stderr."""
    return subprocess.run([*ONNXLLM, *map(str, args)], input=input, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def with_template(pkg: Path, tmp_path: Path, template: str = CHATML) -> Path:
    """A copy of `pkg` under `tmp_path` whose manifest names a ChatML chat template."""
    out = tmp_path / "chatpkg"
    shutil.copytree(pkg, out)
    (out / "chat_template.jinja").write_text(template)
    manifest = json.loads((out / "onnxllm.json").read_text())
    manifest["chat_template"] = "chat_template.jinja"
    (out / "onnxllm.json").write_text(json.dumps(manifest))
    return out

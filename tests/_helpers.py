"""Helpers tests share (no test file imports another): the CLI as a subprocess, a package with a chat template.

    from _helpers import ONNXLLM, cli, with_template
    from _helpers import FakeSession, VerifyingFakeSession   # scripted logits, for the generation loop
    from _helpers import IDS, TOLERANCE, logits, rel_rms     # quantized vs fp32 logits
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from onnxllm.errors import ContextOverflowError

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


class FakeSession:
    """Scripted logits: token t is followed by the token in `script[t]`; records what was fed."""

    context = 64  # reserve() refuses more
    can_verify = False  # no all_logits forward: no drafts

    def __init__(self, vocab=16, script=None):
        self.vocab = vocab
        self.script = script or {}
        self.tokens: list[int] = []
        self.fed: list[list[int]] = []

    def _logits(self, last):
        out = np.linspace(0.0, 1.0, self.vocab, dtype=np.float32)  # a smooth spread for sampling
        out[self.script.get(last, (last + 1) % self.vocab)] = 5.0
        return out

    def forward(self, ids):
        self.fed.append(list(ids))
        self.tokens.extend(ids)
        return self._logits(self.tokens[-1])

    def common_prefix(self, ids):
        n = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            n += 1
        return n

    def rewind(self, n):
        self.tokens = self.tokens[:n]

    def reserve(self, total):
        if total > 64:
            raise ContextOverflowError("too long")


class VerifyingFakeSession(FakeSession):
    """FakeSession's scripted logits (token t -> script.get(t, t + 1)), with the speculative interface:
    forward(ids, all_logits=True) gives each fed position's logits."""

    can_verify = True
    context = 64  # FakeSession.reserve refuses more

    def forward(self, ids, *, all_logits=False):
        self.fed.append(list(ids))
        start = len(self.tokens)
        self.tokens.extend(ids)
        assert len(self.tokens) <= self.context, "a pass went past the context"
        rows = np.stack([self._logits(self.tokens[i]) for i in range(start, len(self.tokens))])
        return rows if all_logits else rows[-1]


# Relative RMS difference of the logits, quantized vs fp32, on random tiny models (hidden 64, weights
# N(0, 0.08)). Weight rounding alone is ~0.5% (int8) / ~8% (int4 sym, step = absmax/8) per MatMul; a
# random network amplifies it ~3-4x by the logits: measured 1.6-2.4% (int8) and 14-24% (int4) over
# llama/mistral/qwen2/gpt2, symmetric and not. A wrong layout or row order gives uncorrelated logits
# (~140%), so these bounds catch real bugs without flaking on rounding.
TOLERANCE = {"int8": 0.05, "int4": 0.35}


def rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).mean() / (a ** 2).mean()))


def logits(pkg: Path, variant: str, ids: list[int]) -> np.ndarray:
    """Every position's logits of one variant, through plain ONNX Runtime (quantize.quality's runner)."""
    from onnxllm.package import read_manifest
    from onnxllm.quantize.quality import DecoderRunner

    m = read_manifest(pkg)
    return DecoderRunner(pkg / m.variants[variant].file, m).logits(ids)


IDS = [int(i) for i in np.random.default_rng(0).integers(0, 300, 40)]

"""The scale workload: random-weight checkpoints shaped like bigger models (benchmarks/make_scale_checkpoint.py),
each runtime at 4 and 8 bits from the same checkpoint, one token per step (random weights make drafts
pointless), the same Hamlet token ids as the 135M rows (valid ids of every vocabulary here).

    onnxllm    `onnxllm export CKPT` + `onnxllm quantize --scheme int4 | int8-dynamic` (RTN from float16 weights)
               (not int4-exact, the 135M default: it imports a GGUF's 4-bit blocks, and these packages come
               from safetensors)
    genai      onnxruntime-genai's builder, -p int4 / int8, on the checkpoint
    llamacpp   the checkpoint written as an F16 GGUF, then llama_model_quantize to Q4_0 / Q4_K_M / Q8_0
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from .common import HERE, MODELS, PROJECT_PY, ROOT, VENV_PY

SCALE_VARIANTS = {
    "onnxllm": ["int4/no-draft", "int8-dynamic/no-draft"],
    "genai": ["int4", "int8"],
    "llamacpp": ["Q4_0", "Q4_K_M", "Q8_0"],
}


def scale_pairs(only: str | None = None) -> list[tuple[str, str]]:
    """The (runtime, variant) rows of the scale workload, filtered like --only (runtime or runtime:variant)."""
    pairs = [(rt, v) for rt, vs in SCALE_VARIANTS.items() for v in vs]
    if not only:
        return pairs
    wanted = [x.strip().partition(":") for x in only.split(",") if x.strip()]
    return [(rt, v) for rt, v in pairs if any(rt == w and (not wv or wv.lower() == v.lower()) for w, _, wv in wanted)]


def parameters(cfg: dict) -> int:
    """Weights of a decoder config (tied embedding counted once; norms and biases left out)."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads
    per_layer = h * (heads + 2 * kv) * d + heads * d * h + 3 * h * inter
    return cfg["vocab_size"] * h + layers * per_layer


class ScaleModels:
    """Builds and caches one scale's models under benchmarks/.peers/models/scale-NAME/ (runs the builders
    through the Runner's subprocess helper, which logs them)."""

    def __init__(self, runner, name: str):
        self.runner, self.name = runner, name
        self.dir = MODELS / f"scale-{name}"
        self.ckpt = self.dir / "checkpoint"
        self.gguf = self.dir / "model-f16.gguf"

    def checkpoint(self) -> bool:
        if (self.ckpt / "config.json").exists() and self.gguf.exists():
            return True
        self.dir.mkdir(parents=True, exist_ok=True)
        cmd = [str(PROJECT_PY), str(HERE / "make_scale_checkpoint.py"), self.name, "-o", str(self.ckpt),
               "--gguf", str(self.gguf)]
        return self._run(cmd, f"checkpoint {self.name}", 3600)

    def _run(self, cmd: list[str], what: str, timeout: float) -> bool:
        log = self.runner.log
        log("$ " + shlex.join(cmd))
        try:
            p = subprocess.run(cmd, stdout=self.runner.logf, stderr=subprocess.STDOUT, check=False, timeout=timeout,
                               cwd=str(ROOT))
        except subprocess.TimeoutExpired:
            log(f"  ! {what} timed out")
            return False
        if p.returncode != 0:
            log(f"  ! {what} failed (rc {p.returncode}, see the log)")
        return p.returncode == 0

    def model_for(self, runtime: str, variant: str) -> tuple[Path | None, str]:
        if not self.checkpoint():
            return None, f"could not make the {self.name} checkpoint (see the log)"
        base = variant.split("/", 1)[0]
        if runtime == "onnxllm":
            pkg = self.dir / "onnxllm"
            cli = ROOT / ".venv" / "bin" / "onnxllm"
            if not (pkg / "onnxllm.json").exists():
                if not self._run([str(cli), "export", str(self.ckpt), "-o", str(pkg), "--no-verify"],
                                 f"onnxllm export {self.name}", 7200):
                    return None, "onnxllm export failed (see the log)"
            if not self.runner.onnxllm_variant(pkg, base):
                return None, f"`onnxllm quantize --scheme {base}` failed"
            return pkg, ""
        py = VENV_PY[runtime]
        if not py.exists():
            return None, f"{py} does not exist (run benchmarks/setup_peers.sh)"
        if runtime == "genai":
            out = self.dir / f"genai-{base}"
            if not (out / "genai_config.json").exists():
                rc, _ = self.runner.sub(py, ["--build", f"genai-{base}", "--src", str(self.ckpt), "--out", str(out),
                                             "--threads", str(self.runner.args.threads)], f"genai builder {base}", 7200)
                if rc != 0:
                    return None, f"onnxruntime-genai's builder failed for -p {base} (see the log)"
            return out, ""
        if runtime == "llamacpp":
            out = self.dir / f"model-{base}.gguf"
            if not out.exists():
                rc, _ = self.runner.sub(py, ["--build", f"llamacpp-{base}", "--src", str(self.gguf), "--out", str(out)],
                                        f"llama.cpp quantize {base}", 3600)
                if rc != 0:
                    return None, "llama_model_quantize failed (see the log)"
            return out, ""
        return None, f"runtime {runtime} is not part of the scale workload"

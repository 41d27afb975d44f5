"""Where a decode step's time goes: ONNX Runtime's profiler, summed per operator type.

    .venv/bin/python benchmarks/profile_decode.py PACKAGE [--variant int8] [--prompt-tokens 64] [--steps 64]

Runs one prefill of `--prompt-tokens` tokens, then `--steps` one-token decode steps through onnxllm's own
DecoderSession (IO binding, shared KV buffers, last-position logits), with ORT's profiler on, and prints
per operator type: kernel microseconds per step, share, and nodes per step; plus the model_run time per
step and, separately, the same steps timed without the profiler (the profiler adds ~10 us per node, so
its absolute figures are inflated; compare shares, and compare runs side by side).
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

# A profiler needs the session below the Model (its own SessionOptions with profiling on), so this
# script, unlike the others, opens one with the runtime's own parts.
from onnxllm.package import find_package_root, read_manifest, safe_path
from onnxllm.runtime.providers import default_threads, session_options
from onnxllm.runtime.session import open_session


def _decode_steps(session, prompt: list[int], steps: int) -> list[float]:
    session.reset()
    session.forward(prompt)
    token, times = prompt[-1], []
    for _ in range(steps):
        start = time.perf_counter()
        token = int(np.argmax(session.forward([token])))
        times.append(time.perf_counter() - start)
    return times


def profile(package: Path, variant: str | None, prompt_tokens: int, steps: int, threads: int) -> dict:
    root = find_package_root(package)
    manifest = read_manifest(root)
    variant = variant or manifest.default_variant.get("cpu") or next(iter(manifest.variants))
    onnx_path = safe_path(root, manifest.variants[variant].file)
    prompt = [int(t) for t in np.random.default_rng(0).integers(100, 10000, prompt_tokens)]
    providers = ["CPUExecutionProvider"]

    plain = open_session(onnx_path, manifest, providers=providers, options=session_options(threads=threads))
    _decode_steps(plain, prompt, 8)  # warm-up
    unprofiled = float(np.median(_decode_steps(plain, prompt, steps)))
    del plain

    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(threads=threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = open_session(onnx_path, manifest, providers=providers, options=options)
        _decode_steps(session, prompt, steps)
        events = json.loads(Path(session.session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    decode_runs = runs[1:]  # the first is the prefill
    first = decode_runs[0]["ts"]
    per_op, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
            per_op[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    n = len(decode_runs)
    return {"package": str(root), "variant": variant, "prompt_tokens": prompt_tokens, "steps": n, "threads": threads,
            "step_ms_unprofiled": round(unprofiled * 1e3, 3),
            "model_run_us_profiled": round(sum(e["dur"] for e in decode_runs) / n, 1),
            "ops": {op: {"us_per_step": round(us / n, 1), "nodes_per_step": count[op] / n}
                    for op, us in per_op.most_common()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package")
    parser.add_argument("--variant")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = profile(Path(args.package), args.variant, args.prompt_tokens, args.steps, args.threads)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"$ {' '.join(sys.argv)}")
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads; python {platform.python_version()}, "
          f"onnxruntime {ort.__version__}")
    print(f"{result['variant']}: decode step {result['step_ms_unprofiled']:.2f} ms without the profiler "
          f"({1e3 / result['step_ms_unprofiled']:.1f} tok/s), {result['model_run_us_profiled'] / 1e3:.2f} ms with it; "
          f"after a {args.prompt_tokens}-token prompt, {result['steps']} steps")
    total = sum(v["us_per_step"] for v in result["ops"].values())
    print(f"{'operator':34s} {'us/step':>8s} {'share':>6s} {'nodes':>6s}")
    for op, v in result["ops"].items():
        print(f"{op:34s} {v['us_per_step']:8.0f} {100 * v['us_per_step'] / total:5.1f}% {v['nodes_per_step']:6.0f}")
    print(f"{'all kernels':34s} {total:8.0f}        {sum(v['nodes_per_step'] for v in result['ops'].values()):6.0f}")


if __name__ == "__main__":
    main()

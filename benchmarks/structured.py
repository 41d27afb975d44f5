"""Structured output's cost: decode tok/s with a JSON schema against without, on the same prompts, and the mask's
cost per token.

    .venv/bin/python benchmarks/structured.py [MODEL] [--variant V] [--threads 2] [--runs 3] [--cases 12]
                                              [--max-tokens 128]
    .venv/bin/python benchmarks/structured.py --engines [--tokenizer tokenizer.json]

MODEL (a package or catalog name) defaults to smollm2-135m-instruct. The prompts are the first --cases of every
fourth schema in tests/fixtures/structured_schemas.json, through the chat template, greedy; each is generated
without the schema and with it, alternately, --runs times, with drafts off (the mask alone) and on (the default:
prompt lookup plus the grammar's forced tokens). decode tok/s is the median per prompt, then the median over
prompts. The mask cost is measured apart: the constrained answers replayed through a fresh constraint, timing
what the loop calls per token (sync the matcher, compute the mask, apply it to a logits vector).

--engines times the three engines the issue names on the same tokenizer (49152 tokens for SmolLM2) and the
same documents: compile per schema and mask + advance per token; llguidance is the one onnxllm uses, xgrammar and
outlines-core are timed when importable (pip install --no-deps xgrammar apache-tvm-ffi outlines-core; xgrammar
also needs torch). Compact JSON (separators "," and ":") so every engine accepts the same tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import onnxllm

CASES = json.loads((Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "structured_schemas.json")
                   .read_text(encoding="utf-8"))


def _prompt(case: dict) -> str:
    return f"{case['prompt']} Reply with JSON only, matching this schema: {json.dumps(case['schema'])}"


def _versions() -> str:
    import importlib.metadata as md

    def v(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "-"

    return (f"python {platform.python_version()}, onnxruntime {ort.__version__}, onnxllm {onnxllm.__version__}, "
            f"llguidance {v('llguidance')}, xgrammar {v('xgrammar')}, outlines-core {v('outlines-core')}")


def mask_cost_us(model, case: dict, tokens: list[int]) -> list[float]:
    """Per token, what the loop pays for the constraint: sync + mask + apply, in microseconds."""
    constraint = model.constraint(model.config(json_schema=case["schema"]))
    logits = np.random.default_rng(0).normal(size=constraint.n_vocab).astype(np.float32)
    out = []
    for i in range(len(tokens) + 1):
        start = time.perf_counter()
        constraint.process(logits, tokens[:i])
        out.append((time.perf_counter() - start) * 1e6)
    return out


def decode(args) -> None:
    m = onnxllm.load(args.model, variant=args.variant, threads=args.threads)
    cases = CASES[::4][:args.cases]
    print(f"$ {' '.join(sys.argv)}")
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads; {_versions()}; "
          f"{m.root.name} {m.variant}; {len(cases)} prompts, greedy, {args.runs} runs, max_tokens {args.max_tokens}")
    print("| drafts | prompt | tok/s free | tok/s schema | ratio | schema tokens | accepted / drafted (schema) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    ratios: dict[int, list[float]] = {0: [], 8: []}
    answers = []
    for draft_tokens in (0, 8):
        for case in cases:
            runs: dict[str, list] = {"free": [], "schema": []}
            for _ in range(args.runs):  # alternate, so both see the same machine
                runs["free"].append(m.generate(_prompt(case), chat=True, max_tokens=args.max_tokens,
                                               draft_tokens=draft_tokens))
                runs["schema"].append(m.generate(_prompt(case), chat=True, max_tokens=args.max_tokens,
                                                 draft_tokens=draft_tokens, json_schema=case["schema"]))
            free, schema = (statistics.median(r.timings.decode_tokens_per_s for r in rs) for rs in runs.values())
            t = runs["schema"][0].timings
            ratios[draft_tokens].append(schema / free)
            if draft_tokens == 0:
                answers.append((case, runs["schema"][0].token_ids))
            print(f"| {draft_tokens} | {case['name']} | {free:.0f} | {schema:.0f} | {schema / free:.2f}x | "
                  f"{t.generated_tokens} | {t.accepted_tokens} / {t.drafted_tokens} |", flush=True)
    for k, rs in ratios.items():
        print(f"drafts {k}: schema / free decode tok/s median {statistics.median(rs):.2f}x, "
              f"range {min(rs):.2f}-{max(rs):.2f}x")
    costs = [c for case, tokens in answers for c in mask_cost_us(m, case, tokens)]
    step_us = 1e6 / statistics.median(
        r.timings.decode_tokens_per_s for r in [m.generate(_prompt(c), chat=True, max_tokens=args.max_tokens,
                                                           draft_tokens=0) for c, _ in answers[:3]])
    print(f"mask cost per token over {len(costs)} tokens: median {statistics.median(costs):.0f} us, "
          f"mean {statistics.mean(costs):.0f} us, p90 {np.percentile(costs, 90):.0f} us, max {max(costs):.0f} us; "
          f"an unconstrained decode step here takes {step_us:.0f} us (mean mask = "
          f"{statistics.mean(costs) / step_us:.1%} of it)")


# (schema, compact documents that break it): ranges, lengths, counts, patterns
INVALID = [
    ({"type": "integer", "minimum": 0, "maximum": 120}, ["121", "-5"]),
    ({"type": "number", "exclusiveMinimum": 0, "maximum": 1}, ["0", "1.5"]),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}, ["[1]", "[1,2,3,4]"]),
    ({"type": "string", "minLength": 2, "maxLength": 4}, ['"a"', '"abcde"']),
    ({"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, ['"AB-1234"']),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False},
     ['{}', '{"a":1,"b":2}']),
]


def engines(args) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(args.tokenizer)
    n_vocab, eos = tok.get_vocab_size(with_added_tokens=True), args.eos
    cases = [c for c in CASES if "format" not in json.dumps(c["schema"])][:args.cases]  # formats differ per engine
    # Documents: what llguidance itself generates for each schema from random logits (valid by construction),
    # written compactly so that every engine's separators accept them.
    import llguidance
    import llguidance.numpy as lln

    start = time.perf_counter()
    llt = llguidance.LLTokenizer(tok.to_str(), eos_token=[eos])
    setup = {"llguidance": time.perf_counter() - start}
    compact = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
    rng = np.random.default_rng(0)
    docs = []
    for case in cases:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(case["schema"], defaults=compact)
        matcher = llguidance.LLMatcher(llt, grammar, log_level=0)
        bits = lln.allocate_token_bitmask(1, n_vocab)
        ids = []
        while not matcher.is_stopped() and len(ids) < 200:
            lln.fill_next_token_bitmask(matcher, bits)
            allowed = np.flatnonzero(np.unpackbits(bits.view(np.uint8), count=n_vocab, bitorder="little"))
            # prefer closing a document: EOS when allowed, else a random allowed token
            t = eos if eos in allowed else int(rng.choice(allowed))
            if t == eos:
                break
            matcher.consume_token(t)
            ids.append(t)
        docs.append((case["schema"], tok.encode(tok.decode(ids), add_special_tokens=False).ids + [eos]))
    results = {}

    def timeit(name, build, step):
        compile_ms, per, refused = [], [], 0
        for schema, ids in docs:
            t = time.perf_counter()
            state = build(schema)
            compile_ms.append((time.perf_counter() - t) * 1e3)
            for i in ids:
                t = time.perf_counter()
                ok = step(state, i)
                per.append((time.perf_counter() - t) * 1e6)
                if not ok:
                    refused += 1
                    print(f"  {name} rejected token {i} ({tok.decode([i])!r}) in a valid document of "
                          f"{json.dumps(schema)[:60]}")
                    break
        wrong = 0
        for schema, texts in INVALID:  # documents that break the schema: an engine must refuse some token of each
            for text in texts:
                state = build(schema)
                ids = tok.encode(text, add_special_tokens=False).ids + [eos]
                wrong += all(step(state, i) for i in ids)
        results[name] = (compile_ms, per, refused, wrong)

    def llg_build(schema):
        return llguidance.LLMatcher(llt, llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=compact),
                                    log_level=0)

    bits = lln.allocate_token_bitmask(1, n_vocab)

    def llg_step(m, i):
        lln.fill_next_token_bitmask(m, bits)
        return bool((bits[0, i >> 5] >> (i & 31)) & 1) and (i == eos or m.consume_token(i))

    timeit("llguidance", llg_build, llg_step)
    try:
        import xgrammar as xgr

        start = time.perf_counter()
        vocab = [""] * n_vocab
        for s, i in tok.get_vocab(with_added_tokens=True).items():
            vocab[i] = s
        info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.BYTE_LEVEL, vocab_size=n_vocab,
                                 stop_token_ids=[eos])
        compiler = xgr.GrammarCompiler(info)
        setup["xgrammar"] = time.perf_counter() - start
        xbits = xgr.allocate_token_bitmask(1, n_vocab)

        def xg_step(m, i):
            m.fill_next_token_bitmask(xbits)
            return bool((int(xbits[0, i >> 5]) >> (i & 31)) & 1) and (i == eos or m.accept_token(i))

        timeit("xgrammar", lambda s: xgr.GrammarMatcher(compiler.compile_json_schema(
            json.dumps(s), any_whitespace=False, separators=(",", ":"))), xg_step)
    except ImportError as exc:
        print(f"xgrammar not timed: {exc}")
    try:
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema

        start = time.perf_counter()
        # GPT-2's byte <-> character table, reversed, to give outlines-core each token's bytes
        bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
        cs, n = bs[:], 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        char_to_byte = {chr(c): b for b, c in zip(bs, cs)}
        special = {t.content for t in tok.get_added_tokens_decoder().values()}
        vmap: dict[bytes, list[int]] = {}
        for s, i in tok.get_vocab(with_added_tokens=True).items():
            if i != eos:
                vmap.setdefault(s.encode() if s in special else bytes(char_to_byte[c] for c in s), []).append(i)
        vocabulary = Vocabulary(eos, vmap)
        setup["outlines-core"] = time.perf_counter() - start
        obits = np.full((1, (n_vocab + 31) // 32), -1, dtype=np.int32)

        def oc_step(g, i):
            g.write_mask_into(obits.ctypes.data, obits.size, 4)
            ok = bool((obits[0, i >> 5] >> (i & 31)) & 1)
            if ok and i != eos:
                g.advance(i, return_tokens=False)
            return ok

        timeit("outlines-core", lambda s: Guide(Index(build_regex_from_schema(json.dumps(s), r"[ ]?"), vocabulary)),
               oc_step)
    except ImportError as exc:
        print(f"outlines-core not timed: {exc}")
    print(f"$ {' '.join(sys.argv)}")
    print(f"{platform.processor() or platform.machine()}; {_versions()}; tokenizer {args.tokenizer} "
          f"({n_vocab} tokens); {len(docs)} schemas, {sum(len(d) for _, d in docs)} tokens")
    print("| engine | tokenizer setup s | compile ms median (max) | mask + advance us/token median | mean | p90 "
          f"| max | valid documents refused (of {len(docs)}) "
          f"| invalid accepted (of {sum(len(t) for _, t in INVALID)}) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (compile_ms, per, refused, wrong) in results.items():
        print(f"| {name} | {setup[name]:.2f} | {statistics.median(compile_ms):.1f} ({max(compile_ms):.0f}) | "
              f"{statistics.median(per):.0f} | {statistics.mean(per):.0f} | {np.percentile(per, 90):.0f} | "
              f"{max(per):.0f} | {refused} | {wrong} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    parser.add_argument("--variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--engines", action="store_true", help="time llguidance, xgrammar and outlines-core instead")
    parser.add_argument("--tokenizer", default=str(Path.home() / ".cache" / "onnxllm" / "smollm2-135m-instruct"
                                                   / "tokenizer.json"))
    parser.add_argument("--eos", type=int, default=2, help="EOS id for --engines (SmolLM2: 2)")
    args = parser.parse_args()
    engines(args) if args.engines else decode(args)


if __name__ == "__main__":
    main()

"""Speculative decoding by prompt lookup: the drafts, the check, and that the output stays the model's."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _helpers import VerifyingFakeSession, cli

import onnxllm
from onnxllm.errors import GenerationError
from onnxllm.runtime.generate import GenerationConfig, generate_tokens
from onnxllm.runtime.lookup import PromptLookup
from onnxllm.runtime.sampling import make_verifier, softmax


def _tokens(events):
    return [e.token for e in events if e.token is not None]


# -- the drafts ------------------------------------------------------------------------------------
def test_lookup_drafts_what_followed_the_latest_longest_match():
    lk = PromptLookup([1, 2, 3, 4, 9, 2, 3, 5, 7, 2, 3])
    assert lk.draft(2) == [5, 7]  # "2 3" last seen before 5 7 (the latest occurrence wins over 2 3 4)
    lk.append(4)
    assert lk.draft(3) == [9, 2, 3]  # "2 3 4" (3-gram) beats "3 4"/"4" and points at the first occurrence
    assert lk.draft(0) == []
    assert PromptLookup([1, 2, 3]).draft(4) == []  # nothing repeats
    assert PromptLookup([5, 6, 5]).draft(4) == [6, 5, 6, 5]  # a 1-gram match; a loop is drafted as a loop
    assert PromptLookup([1, 2, 3, 1, 2]).draft(5) == [3, 1, 2, 3, 1]


# -- the check ----------------------------------------------------------------------------------
def test_greedy_drafts_give_the_same_tokens_in_fewer_passes():
    script = {3: 1}  # 1 2 3 1 2 3 ...: a loop prompt lookup predicts
    plain = list(generate_tokens(VerifyingFakeSession(script=script), [1, 2, 3],
                                 GenerationConfig(max_tokens=30, draft_tokens=0)))
    session = VerifyingFakeSession(script=script)
    drafted = list(generate_tokens(session, [1, 2, 3], GenerationConfig(max_tokens=30, draft_tokens=8)))
    assert _tokens(drafted) == _tokens(plain) == [1, 2, 3] * 10
    t = drafted[-1].timings
    assert t.decode_passes < 10 and 0 < t.accepted_tokens <= t.drafted_tokens
    # every token given out came from a pass or is an accepted guess (the last pass's own token may be dropped)
    assert t.generated_tokens - 1 <= t.decode_passes + t.accepted_tokens <= t.generated_tokens
    assert max(len(f) for f in session.fed[1:]) == 9  # the draft length grew from 4 to the cap of 8
    assert plain[-1].timings.decode_passes == 29


def test_a_rejected_draft_is_replaced_and_rewound():
    # The prompt says 7 -> 8, but the model goes 7 -> 2: the draft [8, ...] is rejected at its first token.
    session = VerifyingFakeSession(script={7: 2, 2: 9})
    events = list(generate_tokens(session, [7, 8, 1, 6], GenerationConfig(max_tokens=4, draft_tokens=4)))
    assert _tokens(events) == [7, 2, 9, 10]
    t = events[-1].timings
    assert t.drafted_tokens >= 1 and t.accepted_tokens < t.drafted_tokens
    # the cache holds only tokens on the path taken, in order: nothing of a rejected guess survives
    path = [7, 8, 1, 6, 7, 2, 9, 10]
    assert session.tokens == path[: len(session.tokens)]


class _PositionalSession(VerifyingFakeSession):
    """The token after position i is answer[i - prompt length]: a text whose successors lookup can miss."""

    context = 200

    def __init__(self, prompt_len: int, answer: list[int], verify_cost):
        super().__init__(vocab=64)
        self.prompt_len, self.answer, self.verify_cost = prompt_len, answer, verify_cost

    def reserve(self, total):
        assert total <= self.context

    def forward(self, ids, *, all_logits=False):
        self.fed.append(list(ids))
        start = len(self.tokens)
        self.tokens.extend(ids)
        rows = np.zeros((len(self.tokens) - start, self.vocab), np.float32)
        for r, i in enumerate(range(start, len(self.tokens))):
            rows[r, self.answer[min(i + 1 - self.prompt_len, len(self.answer) - 1)]] = 5.0
        return rows if all_logits else rows[-1]


def test_expensive_verify_passes_draft_only_while_the_guesses_pay():
    """Where a multi-token pass costs ~2.3x a one-token pass (float32-activation int4 on CPU), drafts stop
    once guesses miss and resume when the text repeats; the tokens are the same either way."""
    from onnxllm.runtime.lookup import CHEAP_VERIFY, EXPENSIVE_VERIFY, DraftGate

    # 40 tokens where every "1" is followed by a new number (lookup's guess after 1 is always wrong), then a
    # 3-token loop lookup predicts
    answer = [t for k in range(20) for t in (1, 10 + k)] + [5, 6, 7] * 20
    prompt = [1, 9]
    runs = {}
    for name, cost in (("cheap", CHEAP_VERIFY), ("expensive", EXPENSIVE_VERIFY)):
        session = _PositionalSession(len(prompt), answer, cost)
        events = list(generate_tokens(session, prompt, GenerationConfig(max_tokens=90, draft_tokens=8)))
        runs[name] = (_tokens(events), events[-1].timings, session.fed[1:])
    plain = list(generate_tokens(_PositionalSession(len(prompt), answer, CHEAP_VERIFY), prompt,
                                 GenerationConfig(max_tokens=90, draft_tokens=0)))
    assert runs["cheap"][0] == runs["expensive"][0] == _tokens(plain) == answer[:90]
    cheap, expensive = runs["cheap"][1], runs["expensive"][1]
    # the first phase: the cheap cost drafts after every "1", the expensive one gives up after a few misses
    first = lambda fed: sum(len(f) > 1 for f in fed[:30])
    assert first(runs["cheap"][2]) >= 15 and first(runs["expensive"][2]) <= 4
    # the loop: both draft again, and the guesses are taken
    assert expensive.accepted_tokens >= 30 and expensive.decode_passes < len(answer[:90]) - 30
    assert cheap.drafted_tokens > expensive.drafted_tokens

    gate = DraftGate(EXPENSIVE_VERIFY)
    assert gate.length(8) == 8  # optimistic at first: the longest draft yields most per cost
    gate.observe([False] * 6)
    assert gate.length(1) == gate.length(8) == 0  # guesses miss: one-token passes
    gate.observe([True] * 4)
    assert 0 < gate.length(8) < 8  # right again, but not always: a shorter draft pays best
    gate.observe([True] * 12)
    assert gate.length(8) == 8
    cheap = DraftGate(CHEAP_VERIFY)
    cheap.observe([False] * 20)
    assert cheap.length(3) == 3 and cheap.reach(2, 8) == 2  # the cheap cost keeps the loop's adapted length


def test_int4_exact_sessions_carry_the_expensive_verify_cost(package):
    from onnxllm.api import quantize
    from onnxllm.runtime.lookup import CHEAP_VERIFY, EXPENSIVE_VERIFY

    pkg = package("llama")
    quantize(pkg, "int4-exact", evaluate=False)
    quantize(pkg, "int8", evaluate=False)
    assert onnxllm.load(pkg, variant="int4-exact", device="cpu").session.verify_cost == EXPENSIVE_VERIFY
    assert onnxllm.load(pkg, variant="int8", device="cpu").session.verify_cost == CHEAP_VERIFY
    assert onnxllm.load(pkg, variant="fp32", device="cpu").session.verify_cost == CHEAP_VERIFY


def test_eos_inside_accepted_drafts_stops_there():
    script = {3: 1}
    events = list(generate_tokens(VerifyingFakeSession(script=script), [1, 2, 3, 1, 2],
                                  GenerationConfig(max_tokens=40, draft_tokens=8), eos_ids=[3]))
    assert _tokens(events) == [] and events[-1].finish_reason == "eos"
    events = list(generate_tokens(VerifyingFakeSession(script={3: 1, 13: 14}), [1, 2, 3, 1, 2],
                                  GenerationConfig(max_tokens=40, draft_tokens=8), eos_ids=[14]))
    assert events[-1].finish_reason == "length" and len(_tokens(events)) == 40


def test_max_tokens_is_exact_with_drafts_and_does_not_change_the_passes():
    passes = []
    for n in (1, 2, 5, 9, 17):
        session = VerifyingFakeSession(script={3: 1})
        events = list(generate_tokens(session, [1, 2, 3], GenerationConfig(max_tokens=n, draft_tokens=8)))
        assert len(_tokens(events)) == n and events[-1].finish_reason == "length"
        passes.append(session.fed)
    for shorter, longer in zip(passes, passes[1:]):  # what the model sees does not depend on max_tokens
        assert longer[: len(shorter)] == shorter


def test_drafts_stop_at_the_context():
    # prompt + max_tokens == context: the guesses shrink to fit, and nothing is fed past the context.
    session = VerifyingFakeSession(script={3: 1})
    events = list(generate_tokens(session, [1, 2, 3] * 8, GenerationConfig(max_tokens=40, draft_tokens=8)))
    assert len(_tokens(events)) == 40 and len(session.tokens) <= session.context
    assert max(len(f) for f in session.fed[1:]) > 1


def test_sampling_with_drafts_keeps_the_distribution_end_to_end():
    # History-independent logits: every token is a fresh draw from p; the prompt repeats, so most
    # positions are checked guesses. The second token's frequencies must still be p.
    class Fixed(VerifyingFakeSession):
        def _logits(self, last):
            return np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))

    counts, checked = np.zeros(4), 0
    n = 3000
    for seed in range(n):
        events = list(generate_tokens(Fixed(vocab=4), [0, 1, 0, 1, 0], GenerationConfig(max_tokens=3, temperature=1.0,
                                                                                      seed=seed, draft_tokens=4)))
        counts[_tokens(events)[1]] += 1
        checked += events[-1].timings.drafted_tokens > 0
    assert checked > n // 2
    np.testing.assert_allclose(counts / n, [0.5, 0.3, 0.15, 0.05], atol=0.03)


@pytest.mark.parametrize("options", [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                     dict(temperature=1.3, top_p=0.8), dict(temperature=1.0, min_p=0.05)])
def test_verifier_keeps_the_samplers_distribution(options):
    # Speculative sampling with a one-token draft: accept it with p(draft), else draw from p without it.
    # The tokens it returns must follow p exactly, whatever the draft.
    from onnxllm.runtime.sampling import distribution

    logits = np.random.default_rng(3).standard_normal(12).astype(np.float32) * 2
    idx, probs = distribution(options.get("temperature"), options.get("top_k", 0), options.get("top_p", 1.0),
                               options.get("min_p", 0.0))(logits)
    expected = np.zeros(12)
    expected[idx if idx is not None else np.arange(12)] = probs
    verify = make_verifier(**options, rng=np.random.default_rng(0))
    n = 40000
    for draft in (int(np.argmax(logits)), int(np.argmin(logits)), 4):
        counts = np.bincount([verify(logits, draft)[0] for _ in range(n)], minlength=12) / n
        assert np.abs(counts - expected).max() < 0.012, (draft, counts, expected)
        assert counts[expected == 0].sum() == 0


def test_verifier_greedy_accepts_only_the_argmax():
    verify = make_verifier()
    logits = softmax(np.array([0.1, 3.0, 0.2], dtype=np.float32))
    assert verify(logits, 1) == (1, True) and verify(logits, 2) == (1, False)


@pytest.mark.parametrize("bad", [-1, 65, True, 2.5])
def test_bad_draft_tokens_is_an_error(tiny_llama, bad):
    with pytest.raises(GenerationError, match="draft_tokens"):
        onnxllm.load(tiny_llama).generate("hello", draft_tokens=bad)


# -- real sessions ----------------------------------------------------------------------------------
REPETITIVE = "one two three four, one two three four, one two three four, one two three"


@pytest.mark.parametrize("options", [dict(), dict(repetition_penalty=1.3),
                                     dict(presence_penalty=0.5, frequency_penalty=0.3)])
def test_real_session_greedy_equals_one_token_per_step(tiny_llama, options):
    m = onnxllm.load(tiny_llama)
    plain = m.generate(REPETITIVE, max_tokens=48, draft_tokens=0, **options)
    drafted = m.generate(REPETITIVE, max_tokens=48, draft_tokens=8, **options)
    assert drafted.token_ids == plain.token_ids  # an fp32 model: the check's logits equal one-step logits
    t = drafted.timings
    assert t.drafted_tokens > 0 and t.generated_tokens - 1 <= t.decode_passes + t.accepted_tokens <= t.generated_tokens
    assert plain.timings.drafted_tokens == 0 and plain.timings.decode_passes == plain.timings.generated_tokens - 1


def test_real_session_sampling_with_drafts_is_seeded(tiny_llama):
    m = onnxllm.load(tiny_llama)
    a = m.generate(REPETITIVE, max_tokens=32, temperature=0.8, top_k=20, seed=5)
    b = m.generate(REPETITIVE, max_tokens=32, temperature=0.8, top_k=20, seed=5)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 32
    # the cache ends holding the prompt and the tokens generated (plus at most the last accepted guesses)
    prompt = m.encode(REPETITIVE)
    held = m.session.tokens
    assert held[: len(prompt)] == prompt and held[len(prompt):] == b.token_ids[: len(held) - len(prompt)]


def test_growing_cache_does_not_draft(tiny_llama):
    m = onnxllm.load(tiny_llama, kv_mode="growing")
    r = m.generate(REPETITIVE, max_tokens=16)
    plain = onnxllm.load(tiny_llama).generate(REPETITIVE, max_tokens=16, draft_tokens=0)
    assert r.timings.drafted_tokens == 0 and r.token_ids == plain.token_ids


def test_cli_draft_tokens(tiny_llama):
    on = json.loads(cli("run", tiny_llama, REPETITIVE, "--raw", "--max-tokens", "24", "--json").stdout)
    off = json.loads(cli("run", tiny_llama, REPETITIVE, "--raw", "--max-tokens", "24", "--draft-tokens", "0",
                         "--json").stdout)
    assert on["tokens"] == off["tokens"]
    assert off["timings"]["drafted_tokens"] == 0 and on["timings"]["drafted_tokens"] > 0
    bad = cli("run", tiny_llama, "hi", "--draft-tokens", "-2")
    assert bad.returncode == 1 and "draft_tokens" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_bench_text_prompts_and_draft_counts(tiny_llama, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(REPETITIVE)
    r = json.loads(cli("bench", tiny_llama, "--prompt-tokens", "24", "--gen-tokens", "16", "--runs", "1", "--text",
                       str(text), "--json").stdout)
    row = r["results"][0]
    assert r["draft_tokens"] == 8 and r["prompts"] == "text" and row["drafted_tokens"] > 0
    assert 15 <= row["decode_passes"] + row["accepted_tokens"] <= 16
    off = json.loads(cli("bench", tiny_llama, "--prompt-tokens", "24", "--gen-tokens", "16", "--runs", "1",
                         "--draft-tokens", "0", "--json").stdout)
    assert off["results"][0]["decode_passes"] == 15 and off["prompts"] == "random token ids"


def test_prefill_chunk_option(tiny_llama):
    r = json.loads(cli("bench", tiny_llama, "--prompt-tokens", "40", "--gen-tokens", "4", "--runs", "1",
                       "--prefill-chunk", "16", "--json").stdout)
    assert r["prefill_chunk"] == 16 and r["results"][0]["prefill_tokens_per_s"] > 0
    m = onnxllm.load(tiny_llama, prefill_chunk=8)
    assert m.session.config.prefill_chunk == 8
    assert m.generate(REPETITIVE, max_tokens=8, draft_tokens=0).token_ids == \
        onnxllm.load(tiny_llama, prefill_chunk=0).generate(REPETITIVE, max_tokens=8, draft_tokens=0).token_ids
    for bad in (-1, 2.5, True):
        with pytest.raises(GenerationError, match="prefill_chunk"):
            onnxllm.load(tiny_llama, prefill_chunk=bad)
    with pytest.raises(GenerationError, match="kv_mode"):
        onnxllm.load(tiny_llama, kv_mode="paged")

"""min_tokens / ignore_eos: exact answer lengths (the generation loop, the API and the CLI)."""

from __future__ import annotations

import dataclasses
import json

import pytest

import onnxllm
from onnxllm.errors import GenerationError
from onnxllm.runtime.generate import GenerationConfig, generate_tokens

from _helpers import cli
from test_runtime import FakeSession
from test_speculative import VerifyingFakeSession

EOS = 4  # FakeSession: token t is followed by t + 1, so from prompt [1] the answer reaches 4 at the third token


def _tokens(events):
    return [e.token for e in events if e.token is not None]


def test_min_tokens_holds_eos_back_then_lets_it_end():
    plain = list(generate_tokens(FakeSession(), [1], GenerationConfig(max_tokens=30), eos_ids=[EOS]))
    assert _tokens(plain) == [2, 3] and plain[-1].finish_reason == "eos"
    events = list(generate_tokens(FakeSession(), [1], GenerationConfig(max_tokens=30, min_tokens=6), eos_ids=[EOS]))
    toks = _tokens(events)
    assert len(toks) >= 6 and EOS not in toks and events[-1].finish_reason == "eos"
    # Held back at the third token: the next most likely one (15, FakeSession's spread) instead, then 0, 1, ...
    assert toks[:6] == [2, 3, 15, 0, 1, 2]


def test_ignore_eos_gives_eos_out_and_runs_to_max_tokens():
    events = list(generate_tokens(FakeSession(), [1], GenerationConfig(max_tokens=8, ignore_eos=True), eos_ids=[EOS]))
    assert _tokens(events) == [2, 3, 4, 5, 6, 7, 8, 9] and events[-1].finish_reason == "length"


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_min_tokens_with_drafts_checks_guesses_against_the_masked_logits(temperature):
    script = {2: EOS}  # 1 -> 2 -> EOS ends at once unless held back; then 15 0 1 2 15 0 ...: a loop to draft
    config = GenerationConfig(max_tokens=20, min_tokens=12, temperature=temperature, seed=3)
    session = VerifyingFakeSession(script=script)
    events = list(generate_tokens(session, [1, 2, 3, 1, 2, 3, 1], config, eos_ids=[EOS]))
    toks = _tokens(events)
    assert len(toks) >= 12 and EOS not in toks[:12]
    if temperature == 0.0:  # greedy: the drafts change the passes, never the tokens
        without = list(generate_tokens(VerifyingFakeSession(script=script), [1, 2, 3, 1, 2, 3, 1],
                                       dataclasses.replace(config, draft_tokens=0), eos_ids=[EOS]))
        assert _tokens(without) == toks and events[-1].timings.decode_passes < without[-1].timings.decode_passes


@pytest.mark.parametrize("bad, match", [(dict(min_tokens=-1), "min_tokens must be"),
                                        (dict(min_tokens=True), "min_tokens must be"),
                                        (dict(min_tokens=9, max_tokens=5), "more than max_tokens"),
                                        (dict(ignore_eos="yes"), "ignore_eos must be"),
                                        (dict(min_tokens=4, json_object=True), "cannot be combined"),
                                        (dict(ignore_eos=True, regex="[ab]+"), "cannot be combined")])
def test_bad_lengths_are_errors(bad, match):
    with pytest.raises(GenerationError, match=match):
        GenerationConfig().updated(**bad).validate()


def test_model_api_exact_lengths(tiny_llama):
    m = onnxllm.load(tiny_llama)
    first = m.generate("hello there", max_tokens=1).token_ids[0]
    # Make the model's own next token its EOS: a real session and tokenizer, an answer that ends at once.
    m.manifest = dataclasses.replace(m.manifest, eos_token_ids=[first])
    assert m.generate("hello there", max_tokens=10).finish_reason == "eos"
    held = m.generate("hello there", max_tokens=10, min_tokens=10)
    assert len(held.token_ids) == 10 and first not in held.token_ids and held.finish_reason == "length"
    ignored = m.generate("hello there", max_tokens=10, ignore_eos=True)
    assert len(ignored.token_ids) == 10 and ignored.token_ids[0] == first and ignored.finish_reason == "length"


def test_cli_min_tokens_and_ignore_eos(tiny_llama):
    proc = cli("run", tiny_llama, "hello", "--raw", "--max-tokens", "7", "--min-tokens", "7", "--ignore-eos", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["tokens"]) == 7 and out["finish_reason"] == "length"
    bad = cli("run", tiny_llama, "hello", "--max-tokens", "3", "--min-tokens", "5")
    assert bad.returncode == 1 and "more than max_tokens" in bad.stderr and "Traceback" not in bad.stderr

"""Log-probabilities: from the distribution each token was drawn from, through the loop, a real model, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from _helpers import FakeSession, VerifyingFakeSession

import onnxllm
from onnxllm.cli import cli
from onnxllm.errors import GenerationError
from onnxllm.runtime.generate import GenerationConfig, generate_tokens
from onnxllm.runtime.sampling import apply_top_k, make_logits_processor


def log_softmax(x) -> np.ndarray:
    return torch.log_softmax(torch.tensor(np.asarray(x, dtype=np.float64)), dim=-1).numpy()


def _steps(events, prompt):
    """(context before the token, token, its TokenLogprobs) for each token given out."""
    seq, out = list(prompt), []
    for e in events:
        if e.token is not None:
            out.append((list(seq), e.token, e.logprobs))
            seq.append(e.token)
    return out


@pytest.mark.parametrize("session_kind,draft_tokens", [(FakeSession, 0), (VerifyingFakeSession, 8)])
def test_greedy_logprobs_are_log_softmax_of_the_logits(session_kind, draft_tokens):
    script = {3: 4, 4: 3}  # a loop, so prompt lookup drafts and the check passes accept them
    session = session_kind(script=script)
    config = GenerationConfig(max_tokens=12, logprobs=True, top_logprobs=3, draft_tokens=draft_tokens)
    steps = _steps(generate_tokens(session, [1, 2, 3, 4, 3, 4], config), [1, 2, 3, 4, 3, 4])
    assert len(steps) == 12
    for before, token, lp in steps:
        expected = log_softmax(session._logits(before[-1]))
        assert lp.token == token and lp.logprob == pytest.approx(expected[token], abs=1e-9)
        best = np.argsort(-expected)[:3]
        assert [t for t, _ in lp.top] == list(best)
        assert [v for _, v in lp.top] == pytest.approx(expected[best], abs=1e-9)
    if draft_tokens:  # drafted tokens were checked in passes of several
        assert any(len(fed) > 1 for fed in session.fed[1:])


def test_logprobs_follow_penalties_temperature_and_masks():
    session = FakeSession(vocab=16)
    config = GenerationConfig(max_tokens=6, temperature=0.8, top_k=4, seed=3, presence_penalty=0.5,
                              frequency_penalty=0.2, logprobs=True, top_logprobs=8)
    prompt = [1, 2]
    process = make_logits_processor(presence_penalty=0.5, frequency_penalty=0.2)
    for before, token, lp in _steps(generate_tokens(session, prompt, config), prompt):
        processed = process(session._logits(before[-1]), before, len(prompt))
        kept = apply_top_k(processed / np.float32(0.8), 4)
        expected = log_softmax(kept)
        assert lp.logprob == pytest.approx(expected[token], abs=1e-6)
        assert len(lp.top) == 4  # the masked tokens are never alternatives


def test_no_logprobs_unless_asked():
    events = list(generate_tokens(FakeSession(), [1, 2], GenerationConfig(max_tokens=3)))
    assert all(e.logprobs is None for e in events)
    with pytest.raises(GenerationError, match="top_logprobs"):
        GenerationConfig(top_logprobs=21).validate()


def test_real_model_logprobs_match_its_logits(tiny_llama):
    """Through ONNX Runtime: each token's logprob is log_softmax of the logits a fresh session gives at that point."""
    model = onnxllm.load(tiny_llama)
    result = model.generate("The quick brown fox", max_tokens=6, logprobs=True, top_logprobs=2, draft_tokens=0)
    assert [lp.token for lp in result.logprobs] == result.token_ids
    reference = onnxllm.load(tiny_llama).session
    seq = model.encode("The quick brown fox")
    for lp in result.logprobs:
        reference.rewind(0)
        expected = log_softmax(reference.forward(seq))
        assert lp.logprob == pytest.approx(expected[lp.token], abs=1e-4)
        assert lp.top[0][0] == int(np.argmax(expected)) == lp.token  # greedy: the top one is the chosen one
        assert lp.text == model.tokenizer.decode([lp.token], skip_special_tokens=False)
        seq.append(lp.token)


def test_cli_json_logprobs(tiny_llama):
    result = CliRunner().invoke(cli, ["run", str(tiny_llama), "Hello", "--raw", "--max-tokens", "4", "--json",
                                      "--logprobs", "2"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert len(data["logprobs"]) == len(data["tokens"]) == 4
    first = data["logprobs"][0]
    assert set(first) == {"token", "text", "logprob", "top"} and len(first["top"]) == 2
    assert first["logprob"] <= 0 and first["token"] == data["tokens"][0]
    plain = CliRunner().invoke(cli, ["run", str(tiny_llama), "Hello", "--raw", "--max-tokens", "2", "--logprobs", "2"])
    assert plain.exit_code == 1 and "--json" in plain.output

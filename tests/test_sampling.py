"""Tests for onnxllm.runtime.sampling."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from onnxllm.errors import GenerationError
from onnxllm.runtime.sampling import (
    apply_min_p,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    make_logits_processor,
    make_sampler,
    softmax,
    validate_sampling,
)

logits_st = arrays(
    np.float32,
    st.integers(1, 64),
    elements=st.floats(-30, 30, width=32, allow_nan=False, allow_infinity=False),
)
seeds = st.integers(0, 2**32 - 1)


# ---------------------------------------------------------------- penalties


def test_repetition_penalty_hf_semantics():
    logits = np.array([2.0, -2.0, 1.0, -1.0, 0.0], dtype=np.float32)
    before = logits.copy()
    out = apply_repetition_penalty(logits, [0, 1, 1, 4], 2.0)
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0, -1.0, 0.0])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(logits, before)  # input untouched


def test_repetition_penalty_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(0)
    logits = rng.normal(size=50).astype(np.float32)
    ids = rng.integers(0, 50, size=30)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(ids)[None], torch.tensor(logits)[None])[0].numpy()
    np.testing.assert_allclose(apply_repetition_penalty(logits, ids, 1.3), ref, rtol=1e-6)


def test_presence_frequency_penalty_openai_semantics():
    logits = np.zeros(4, dtype=np.float32)
    out = apply_presence_frequency_penalty(logits, np.array([0, 1, 3, 0]), presence=0.5, frequency=0.25)
    np.testing.assert_allclose(out, [0.0, -0.75, -1.25, 0.0])
    assert out.dtype == np.float32
    assert not logits.any()


def test_logits_processors_combine_and_respect_prompt_len():
    process = make_logits_processor(repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=0.5)
    logits = np.array([4.0, 4.0, 4.0, 4.0], dtype=np.float32)
    # ids 0 (prompt) and 2, 2 (generated): all seen tokens get /2, only 2 gets presence+frequency.
    out = process(logits, [0, 2, 2], prompt_len=1)
    np.testing.assert_allclose(out, [2.0, 4.0, 2.0 - 1.0 - 1.0, 4.0])
    np.testing.assert_array_equal(logits, 4.0)
    noop = make_logits_processor()
    np.testing.assert_array_equal(noop(logits, [0, 1]), logits)
    assert noop(logits, []) is not logits


def test_out_of_range_token_ids_raise():
    process = make_logits_processor(repetition_penalty=1.2)
    with pytest.raises(GenerationError, match="out of range"):
        process(np.zeros(4, np.float32), [1, 4])
    with pytest.raises(GenerationError, match="out of range"):
        apply_repetition_penalty(np.zeros(4, np.float32), [-1], 1.2)


# ---------------------------------------------------------------- masks


@given(logits_st, st.integers(1, 70))
def test_top_k_keeps_k_best(logits, k):
    out = apply_top_k(logits, k)
    kept = np.isfinite(out)
    assert kept.sum() >= min(k, logits.size)
    assert kept[np.argmax(logits)]
    if kept.sum() > k:  # only ties with the k-th value may be kept beyond k
        assert len(set(logits[kept].tolist())) <= k
    assert logits[kept].min() >= logits[~kept].max(initial=-np.inf)


@given(logits_st, st.floats(0.01, 1.0))
def test_top_p_keeps_smallest_nucleus(logits, p):
    out = apply_top_p(logits, p)
    probs = softmax(logits)
    kept = np.isfinite(out)
    assert kept[np.argmax(logits)]
    assert probs[kept].sum() >= p - 1e-9 or kept.all()
    # minimal: the tokens strictly above the weakest kept one hold less than p (ties are kept together)
    above = logits > logits[kept].min()
    assert probs[above].sum() < p + 1e-9


def test_top_p_large_vocab_uses_same_nucleus_as_full_sort():
    rng = np.random.default_rng(0)
    for scale in (0.1, 3.0, 30.0):
        logits = (rng.normal(size=20000) * scale).astype(np.float32)
        for p in (0.1, 0.5, 0.9, 0.999):
            probs = softmax(logits)
            order = np.argsort(-logits, kind="stable")
            mass_before = np.cumsum(probs[order]) - probs[order]
            expected = np.zeros(logits.size, bool)
            expected[order[mass_before < p]] = True
            np.testing.assert_array_equal(np.isfinite(apply_top_p(logits, p)), expected)


@given(logits_st, st.floats(0.0, 1.0))
def test_min_p_threshold(logits, p):
    out = apply_min_p(logits, p)
    probs = softmax(logits)
    kept = np.isfinite(out)
    assert kept[np.argmax(logits)]
    assert np.all(probs[~kept] < p * probs.max())
    assert np.all(probs[kept] >= p * probs.max())


@settings(max_examples=200)
@given(
    logits_st,
    st.floats(0.05, 3.0),
    st.integers(0, 10),
    st.floats(0.05, 1.0),
    st.floats(0.0, 1.0),
    seeds,
)
def test_sampler_never_picks_masked_token(logits, temperature, top_k, top_p, min_p, seed):
    rng = np.random.default_rng(seed)
    sample = make_sampler(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, rng=rng)
    masked = apply_temperature(logits, temperature)
    masked = apply_min_p(apply_top_p(apply_top_k(masked, top_k), top_p), min_p)
    probs = softmax(masked)
    assert probs.dtype == np.float64
    assert abs(probs.sum() - 1.0) < 1e-9
    assert np.all(probs[~np.isfinite(masked)] == 0.0)
    for _ in range(20):
        tok = sample(logits)
        assert np.isfinite(masked[tok])
        assert probs[tok] > 0


def test_sampler_respects_hard_mask_with_extreme_draws():
    class Edge:
        def __init__(self, values):
            self.values = iter(values)

        def random(self):
            return next(self.values)

    logits = np.array([0.0, 5.0, -np.inf, 5.0, -np.inf], dtype=np.float32)
    sample = make_sampler(temperature=1.0, rng=Edge([0.0, 0.5, np.nextafter(1.0, 0.0)]))
    assert [sample(logits) for _ in range(3)] == [0, 1, 3]


@given(logits_st)
def test_probabilities_sum_to_one(logits):
    for processed in (logits, apply_top_k(logits, 3), apply_top_p(logits, 0.5), apply_min_p(logits, 0.3)):
        probs = softmax(processed)
        assert abs(probs.sum() - 1.0) < 1e-9
        assert np.all(probs >= 0)


# ---------------------------------------------------------------- sampler


@given(logits_st)
def test_greedy_is_argmax(logits):
    assert make_sampler()(logits) == int(np.argmax(logits))
    assert make_sampler(temperature=0.0, top_k=5, top_p=0.3)(logits) == int(np.argmax(logits))


@given(logits_st, seeds, st.floats(0.1, 2.0))
def test_top_k_1_equals_greedy(logits, seed, temperature):
    sample = make_sampler(temperature=temperature, top_k=1, rng=np.random.default_rng(seed))
    # ties for the top value are all kept by top-k, so compare values, not indices
    assert logits[sample(logits)] == logits.max()


@given(logits_st, seeds)
def test_same_seed_same_samples(logits, seed):
    a = make_sampler(temperature=0.9, top_p=0.95, rng=np.random.default_rng(seed))
    b = make_sampler(temperature=0.9, top_p=0.95, rng=np.random.default_rng(seed))
    assert [a(logits) for _ in range(10)] == [b(logits) for _ in range(10)]


def test_sampling_distribution_follows_softmax():
    logits = np.log(np.array([0.1, 0.2, 0.7], dtype=np.float32))
    sample = make_sampler(temperature=1.0, rng=np.random.default_rng(123))
    freq = np.bincount([sample(logits) for _ in range(20000)], minlength=3) / 20000
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.7], atol=0.02)


def test_sampler_does_not_mutate_or_touch_global_rng():
    logits = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    before = logits.copy()
    np.random.seed(0)
    state = np.random.get_state()[1].copy()
    make_sampler(temperature=1.0, top_k=2, top_p=0.9, min_p=0.1, rng=np.random.default_rng(1))(logits)
    make_sampler(temperature=1.0)(logits)
    np.testing.assert_array_equal(logits, before)
    np.testing.assert_array_equal(np.random.get_state()[1], state)


@given(logits_st, st.integers(0, 5), st.floats(0.1, 1.0), st.floats(0, 1))
def test_masks_do_not_mutate_input(logits, k, p, mp):
    before = logits.copy()
    apply_top_k(logits, k)
    apply_top_p(logits, p)
    apply_min_p(logits, mp)
    apply_temperature(logits, 0.7)
    apply_repetition_penalty(logits, [0], 1.5)
    np.testing.assert_array_equal(logits, before)


def test_all_masked_logits_raise():
    with pytest.raises(GenerationError, match="no finite"):
        make_sampler()(np.full(3, -np.inf, dtype=np.float32))
    with pytest.raises(GenerationError, match="no finite"):
        make_sampler(temperature=1.0, rng=np.random.default_rng(0))(np.full(3, np.nan, dtype=np.float32))
    with pytest.raises(GenerationError, match="1-D"):
        make_sampler()(np.zeros((2, 3), dtype=np.float32))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"min_p": -0.01}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ],
)
def test_validate_sampling_rejects_out_of_range(kwargs, match):
    with pytest.raises(GenerationError, match=match):
        validate_sampling(**kwargs)
    if "repetition_penalty" in kwargs:
        with pytest.raises(GenerationError, match=match):
            make_logits_processor(**kwargs)
    else:
        with pytest.raises(GenerationError, match=match):
            make_sampler(**kwargs)


def test_validate_sampling_accepts_edges():
    validate_sampling(0.0, 0, 1.0, 0.0, 1.0)
    validate_sampling(2.0, 50, 1e-6, 1.0, 0.5)
    with pytest.raises(GenerationError, match="presence_penalty"):
        make_logits_processor(presence_penalty=float("nan"))
    with pytest.raises(GenerationError, match="temperature"):
        apply_temperature(np.zeros(3, np.float32), 0.0)


# -- log-probabilities ------------------------------------------------------------------------------
def _log_softmax(x):
    import torch

    return torch.log_softmax(torch.tensor(x, dtype=torch.float64), dim=-1).numpy()


def test_logprobs_greedy_are_log_softmax_of_the_logits():
    from onnxllm.runtime.sampling import make_logprobs

    rng = np.random.default_rng(0)
    logits = rng.normal(size=50).astype(np.float32) * 3
    expected = _log_softmax(logits)
    token = int(np.argmax(logits))
    result = make_logprobs(top_n=5)(logits, token)
    assert result.token == token and result.logprob == pytest.approx(expected[token], abs=1e-9)
    order = np.argsort(-expected)[:5]
    assert [t for t, _ in result.top] == list(order)
    assert [lp for _, lp in result.top] == pytest.approx(expected[order], abs=1e-9)
    assert make_logprobs()(logits, token).top == ()


def test_logprobs_sampling_follow_temperature_and_masks():
    from onnxllm.runtime.sampling import apply_top_k, make_logprobs

    rng = np.random.default_rng(1)
    logits = rng.normal(size=40).astype(np.float32)
    lp = make_logprobs(temperature=0.5, top_k=3, top_n=10)
    kept = apply_top_k(logits / np.float32(0.5), 3)
    expected = _log_softmax(np.where(np.isfinite(kept), kept, -np.inf))
    token = int(np.argsort(-logits)[1])
    result = lp(logits, token)
    assert result.logprob == pytest.approx(expected[token], abs=1e-6)
    assert len(result.top) == 3  # masked tokens are not alternatives
    assert np.exp([p for _, p in result.top]).sum() == pytest.approx(1.0)
    outside = int(np.argmin(logits))
    assert lp(logits, outside).logprob == -np.inf

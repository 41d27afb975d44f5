"""Logits processing and token sampling on one 1-D logits vector (numpy only).

Every function here is pure: it returns a new array and never writes into the
logits it is given. Masked tokens are set to ``-inf``; each mask keeps at least
the most likely token, so a processed vector always has a finite maximum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from onnxllm.errors import GenerationError

__all__ = [
    "apply_min_p", "apply_presence_frequency_penalty", "apply_repetition_penalty", "apply_temperature",
    "apply_top_k", "apply_top_p", "make_logits_processor", "make_logprobs", "make_sampler", "make_verifier",
    "softmax", "TokenLogprobs", "validate_sampling",
]

Sampler = Callable[[np.ndarray], int]
LogitsProcessor = Callable[..., np.ndarray]

_TOP_P_CANDIDATES = 512  # tokens top-p sorts before widening (x8) towards a full sort


def validate_sampling(
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
) -> None:
    """Raise GenerationError when a sampling option is out of range.

    The comparisons are written negated so that NaN is rejected too.
    """
    temperature = _number("temperature", temperature)
    top_p = _number("top_p", top_p)
    min_p = _number("min_p", min_p)
    repetition_penalty = _number("repetition_penalty", repetition_penalty)
    if not (temperature >= 0.0) or math.isinf(temperature):
        raise GenerationError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise GenerationError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    if not (0.0 < top_p <= 1.0):
        raise GenerationError(f"top_p must be in (0, 1] (1 disables it), got {top_p!r}")
    if not (0.0 <= min_p <= 1.0):
        raise GenerationError(f"min_p must be in [0, 1] (0 disables it), got {min_p!r}")
    if not (repetition_penalty > 0.0) or math.isinf(repetition_penalty):
        raise GenerationError(
            f"repetition_penalty must be a finite number > 0 (1 disables it), got {repetition_penalty!r}")


def _as_logits(logits: np.ndarray) -> np.ndarray:
    arr = np.asarray(logits)
    if arr.ndim != 1 or arr.size == 0:
        raise GenerationError(f"logits must be a non-empty 1-D vector, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)  # integer logits would make division and -inf masking wrong
    return arr


def _number(name: str, value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise GenerationError(f"{name} must be a number, got {value!r}") from None


def _token_ids(token_ids: Sequence[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise GenerationError(f"token id {bad} is out of range for a vocabulary of {vocab_size} logits")
    return ids


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities (float64, summing to 1) of a logits vector; ``-inf`` entries get exactly 0."""
    arr = _as_logits(logits).astype(np.float64)
    top = arr.max()
    if not np.isfinite(top):
        raise GenerationError("logits have no finite maximum (all masked, NaN or +inf); cannot sample")
    exp = np.exp(arr - top)
    return exp / exp.sum()


def apply_repetition_penalty(
    logits: np.ndarray, token_ids: Sequence[int] | np.ndarray, penalty: float
) -> np.ndarray:
    """Penalize every token present in ``token_ids`` (prompt + generated), HF semantics.

    A seen token's positive logit is divided by ``penalty`` and a negative one is
    multiplied by it, so ``penalty > 1`` always makes repeats less likely.
    """
    arr = _as_logits(logits)
    out = arr.copy()
    if penalty == 1.0:
        return out
    seen = np.unique(_token_ids(token_ids, arr.size))
    if seen.size:
        vals = out[seen]
        out[seen] = np.where(vals < 0, vals * penalty, vals / penalty)
    return out


def apply_presence_frequency_penalty(
    logits: np.ndarray, counts: np.ndarray, presence: float, frequency: float
) -> np.ndarray:
    """OpenAI semantics: ``logit[j] -= counts[j] * frequency + (counts[j] > 0) * presence``.

    ``counts`` is a per-token occurrence count with one entry per logit.
    """
    arr = _as_logits(logits)
    counts = np.asarray(counts)
    if counts.shape != arr.shape:
        raise GenerationError(f"counts must have the logits' shape {arr.shape}, got {counts.shape}")
    if presence == 0.0 and frequency == 0.0:
        return arr.copy()
    penalty = (counts * frequency + (counts > 0) * presence).astype(arr.dtype)
    return arr - penalty


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Divide logits by ``temperature`` (> 0; greedy decoding is the sampler's job, not this one's)."""
    arr = _as_logits(logits)
    if not (temperature > 0.0) or math.isinf(temperature):
        raise GenerationError(f"apply_temperature needs a finite temperature > 0, got {temperature!r}")
    return (arr / np.asarray(temperature, dtype=arr.dtype)).astype(arr.dtype, copy=False)


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the ``k`` highest logits (ties with the k-th are kept, as in HF); ``k == 0`` disables."""
    arr = _as_logits(logits)
    if k < 0:
        raise GenerationError(f"top_k must be >= 0, got {k}")
    out = arr.copy()
    if k == 0 or k >= arr.size:
        return out
    kth = np.partition(arr, arr.size - k)[arr.size - k]
    out[arr < kth] = -np.inf
    return out


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filtering: keep the smallest top set whose probability mass reaches ``p``.

    Tokens tied with the last one kept are kept too.
    """
    arr = _as_logits(logits)
    if not (0.0 < p <= 1.0):
        raise GenerationError(f"top_p must be in (0, 1], got {p!r}")
    out = arr.copy()
    if p >= 1.0:
        return out
    probs = softmax(arr)
    cand = np.flatnonzero(probs > 0.0)  # already-masked tokens cannot be in the nucleus
    m = _TOP_P_CANDIDATES
    while cand.size > m:
        # Sorting the whole vocabulary is the slow part; if the best m tokens already hold
        # mass p, every other token has at least p above it and is dropped anyway.
        part = cand[np.argpartition(-arr[cand], m - 1)[:m]]
        if probs[part].sum() >= p:
            cand = part
            break
        m *= 8
    order = cand[np.argsort(-arr[cand])]
    sorted_probs = probs[order]
    # A token stays when the mass strictly above it is still short of p (a prefix of the order,
    # so the top token always stays). Cutting by value keeps ties with the last kept token, as
    # top-k does, which makes the result independent of how the sort orders equal logits.
    mass_before = np.cumsum(sorted_probs) - sorted_probs
    threshold = arr[order[np.count_nonzero(mass_before < p) - 1]]
    out[arr < threshold] = -np.inf
    return out


def apply_min_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Drop tokens whose probability is below ``p`` times the top token's; ``p == 0`` disables."""
    arr = _as_logits(logits)
    if not (0.0 <= p <= 1.0):
        raise GenerationError(f"min_p must be in [0, 1], got {p!r}")
    out = arr.copy()
    if p == 0.0:
        return out
    probs = softmax(arr)
    # p <= 1 means p * max <= max, so the top token is never below the threshold.
    out[probs < p * probs.max()] = -np.inf
    return out


def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    cdf = np.cumsum(probs)
    # side="right" lands only on tokens with a positive increment, never a masked (p == 0) one.
    idx = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    if idx >= probs.size:  # rounding pushed the draw past the end
        idx = int(np.flatnonzero(probs)[-1])
    return idx


def _greedy(logits: np.ndarray) -> int:
    arr = _as_logits(logits)
    if not np.isfinite(arr.max()):
        raise GenerationError("logits have no finite maximum (all masked, NaN or +inf); cannot sample")
    return int(np.argmax(arr))


def distribution(temperature: float, top_k: int, top_p: float, min_p: float) -> Callable:
    """``dist(logits) -> (ids, probs)``: the tokens left after the masks (None: every token) and their
    probabilities, after temperature, top-k, top-p and min-p in that order (HF's order)."""

    def dist(logits: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        out = apply_temperature(logits, temperature)
        idx = None
        if 0 < top_k < out.size:
            # Work on the k survivors only: the later steps then cost O(k), not O(vocabulary).
            idx = np.flatnonzero(apply_top_k(out, top_k) > -np.inf)
            out = out[idx]
        return idx, softmax(apply_min_p(apply_top_p(out, top_p), min_p))

    return dist


@dataclass(frozen=True)
class TokenLogprobs:
    """A chosen token's log-probability and the most likely tokens with theirs, best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def make_logprobs(
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    top_n: int = 0,
) -> Callable[[np.ndarray, int], TokenLogprobs]:
    """Return ``logprobs(logits, token) -> TokenLogprobs`` in the distribution ``make_sampler`` draws from
    with the same options: greedy, the softmax of the logits as given (after any penalties); sampling,
    after temperature and the masks, so a masked token has ``-inf`` and never appears among the top ones.
    ``top_n`` alternatives (0: none). The speculative check keeps that distribution, so this holds for
    drafted tokens too."""
    validate_sampling(temperature, top_k, top_p, min_p)
    dist = None if temperature == 0.0 else distribution(temperature, top_k, top_p, min_p)

    def logprobs(logits: np.ndarray, token: int) -> TokenLogprobs:
        if dist is None:
            arr = _as_logits(logits).astype(np.float64)
            top = arr.max()
            if not np.isfinite(top):
                raise GenerationError("logits have no finite maximum (all masked, NaN or +inf); cannot sample")
            logp = arr - (top + np.log(np.exp(arr - top).sum()))
        else:
            idx, probs = dist(logits)
            with np.errstate(divide="ignore"):
                part = np.log(probs)
            if idx is None:
                logp = part
            else:
                logp = np.full(np.asarray(logits).size, -np.inf)
                logp[idx] = part
        best: tuple[tuple[int, float], ...] = ()
        if top_n > 0:
            n = min(top_n, int(np.isfinite(logp).sum()))
            ids = np.argpartition(-logp, n - 1)[:n] if n < logp.size else np.arange(logp.size)
            ids = ids[np.argsort(-logp[ids], kind="stable")]
            best = tuple((int(i), float(logp[i])) for i in ids)
        return TokenLogprobs(int(token), float(logp[token]), best)

    return logprobs


def make_sampler(
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    rng: np.random.Generator | None = None,
) -> Sampler:
    """Return ``sample(logits) -> token_id``.

    ``temperature == 0`` is greedy argmax and ignores the other options. Otherwise
    temperature, top-k, top-p and min-p are applied in that order (HF's order) and a
    token is drawn from ``rng``; pass a seeded ``numpy.random.Generator`` for
    reproducible output. Without one a fresh unseeded generator is made (never the
    global numpy RNG).
    """
    validate_sampling(temperature, top_k, top_p, min_p)
    if temperature == 0.0:
        return _greedy
    generator = rng if rng is not None else np.random.default_rng()
    dist = distribution(temperature, top_k, top_p, min_p)

    def sample(logits: np.ndarray) -> int:
        idx, probs = dist(logits)
        tok = _draw(probs, generator)
        return int(idx[tok]) if idx is not None else tok

    return sample


def make_verifier(
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    rng: np.random.Generator | None = None,
) -> Callable[[np.ndarray, int], tuple[int, bool]]:
    """Return ``verify(logits, draft) -> (token, accepted)`` for speculative decoding.

    Greedy: the argmax, accepted when it is the draft. Sampling (speculative sampling with a draft
    that proposes one token for sure): the draft is accepted with its probability p(draft); otherwise
    a token is drawn from p with the draft removed. Either way the token has exactly the
    distribution ``make_sampler`` draws from, so drafting changes the speed, not the output's law.
    """
    validate_sampling(temperature, top_k, top_p, min_p)
    if temperature == 0.0:

        def verify_greedy(logits: np.ndarray, draft: int) -> tuple[int, bool]:
            token = _greedy(logits)
            return token, token == draft

        return verify_greedy
    generator = rng if rng is not None else np.random.default_rng()
    dist = distribution(temperature, top_k, top_p, min_p)

    def verify(logits: np.ndarray, draft: int) -> tuple[int, bool]:
        idx, probs = dist(logits)
        if idx is None:
            at = draft if 0 <= draft < probs.size else None
        else:
            hit = np.flatnonzero(idx == draft)
            at = int(hit[0]) if hit.size else None
        p = float(probs[at]) if at is not None else 0.0
        if p > 0.0 and generator.random() < p:
            return int(draft), True
        if at is not None:
            probs = probs.copy()
            probs[at] = 0.0
        tok = _draw(probs, generator)
        return (int(idx[tok]) if idx is not None else tok), False

    return verify


def make_logits_processor(
    *,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> LogitsProcessor:
    """The one callable ``process(logits, token_ids_so_far, prompt_len=0) -> logits`` applying all three penalties.

    The repetition penalty counts every id in ``token_ids_so_far`` (prompt and
    generated, as HF does); presence and frequency penalties count only
    ``token_ids_so_far[prompt_len:]`` (the generated part, as OpenAI does) when the
    caller passes ``prompt_len``. Cost per call is an ``np.unique`` and an ``np.bincount``
    over the history plus O(vocabulary) copies; no Python loop over tokens.
    """
    validate_sampling(repetition_penalty=repetition_penalty)
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not math.isfinite(_number(name, value)):
            raise GenerationError(f"{name} must be a finite number, got {value!r}")

    def process(logits: np.ndarray, token_ids_so_far: Sequence[int], prompt_len: int = 0) -> np.ndarray:
        arr = _as_logits(logits)
        ids = _token_ids(token_ids_so_far, arr.size)
        out = apply_repetition_penalty(arr, ids, repetition_penalty)
        if presence_penalty != 0.0 or frequency_penalty != 0.0:
            counts = np.bincount(ids[prompt_len:], minlength=arr.size)  # of the generated tokens only
            out = apply_presence_frequency_penalty(out, counts, presence_penalty, frequency_penalty)
        return out

    return process

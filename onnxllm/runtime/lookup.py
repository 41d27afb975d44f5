"""Prompt-lookup drafts for speculative decoding, with no second model.

Text repeats itself: names, code identifiers, quoted passages, a list's structure, and a small model's
own loops. So the tokens that followed the latest earlier occurrence of the text's last n tokens
(n = 3, then 2, then 1) are a cheap guess at what comes next. The generator feeds the guess to the
model in one pass with the real token before it; the model's own logits at each position accept or
reject it (generate.py), so the output is the model's, whatever the guess. A pass over k + 1 tokens
reads the weights once, which is what a decode step on a CPU spends its time on, so each accepted
token is nearly free. (Saxena's prompt lookup decoding; llama.cpp's lookup decoding.)

An index from each n-gram to the position after its latest occurrence keeps a draft O(n), whatever
the length of the text.
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_NGRAM = 3


class PromptLookup:
    """The text so far (prompt and generated tokens) and its n-gram index."""

    def __init__(self, tokens: Iterable[int] = (), max_ngram: int = MAX_NGRAM):
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        # _next[n][ngram] = the position right after the latest occurrence of ngram that has a successor
        self._next: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_ngram + 1)]
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        self.tokens.append(int(token))
        end = len(self.tokens) - 1  # the new token is the successor of every n-gram ending just before it
        for n in range(1, self.max_ngram + 1):
            if end - n < 0:
                break
            self._next[n][tuple(self.tokens[end - n:end])] = end

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
        if k <= 0:
            return []
        for n in range(min(self.max_ngram, len(self.tokens)), 0, -1):
            start = self._next[n].get(tuple(self.tokens[-n:]))
            if start is not None:
                # A match close to the end runs into the draft itself: a loop continues as a loop.
                seq = self.tokens[start:start + k]
                while len(seq) < k:
                    seq.append(seq[len(seq) - (len(self.tokens) - start)])
                return seq
        return []


# What a verify pass over 1 + g positions costs, in one-token passes, as (fixed, per guess), on ONNX
# Runtime's CPU kernels, measured with SmolLM2-135M after a 64-token prompt (2-vCPU Xeon VM): MatMulNBits
# 4-bit with float32 activations (accuracy level < 4) takes its multi-row path, which unpacks the blocks to
# float32 first: 2.3x at g=1, 2.6x at 4, 3.6x at 8. With int8 activations (level 4, DynamicQuantizeMatMul)
# a pass costs 1.1-1.5x (g=1..8), so drafts pay whenever a guess is right: no gate there.
EXPENSIVE_VERIFY = (2.0, 0.19)
CHEAP_VERIFY = (1.0, 0.0)


def verify_cost(method, provider: str) -> tuple[float, float]:
    """The cost hint of a variant (its QuantizeMethod record, or None for a float variant) on `provider`."""
    if provider != "CPUExecutionProvider" or method is None:
        return CHEAP_VERIFY
    bits, level = getattr(method, "bits", 0), getattr(method, "accuracy_level", 4)
    return EXPENSIVE_VERIFY if bits == 4 and level is not None and 0 < level < 4 else CHEAP_VERIFY


class DraftGate:
    """Whether a draft of g guesses is worth its pass, from the pass's cost and how often guesses are right.

    Each guess is taken to be right with probability `rate` once the one before it was, so a verify pass
    of g guesses yields 1 + rate + ... + rate^g tokens against 1 for a one-token pass; the pass's cost is
    `verify_cost`: fixed + per_guess * g one-token passes. `length` checks the g that yields most per cost
    (long drafts when the text repeats, none when guesses miss). `rate` is a running
    mean over the guesses checked, and, while drafts are held back, over whether the first guess equals the
    token the model then chose (free: no pass is spent), so drafting resumes when the text starts to repeat.
    The decision depends on tokens only, never on timings: the same prompt and seed give the same passes.
    At the cheap cost (1, 0) every draft goes, as before the gate.
    """

    def __init__(self, cost: tuple[float, float] = CHEAP_VERIFY, *, weight: float = 0.2, start: float = 1.0):
        self.fixed, self.per_guess = cost
        self.weight, self.rate = weight, start

    @property
    def cheap(self) -> bool:
        return self.fixed <= 1.0 and self.per_guess <= 0.0

    def reach(self, adapted: int, most: int) -> int:
        """How many guesses to ask lookup for: at the cheap cost the loop's adapted length; else as many as
        allowed, `length` choosing how many of them pay."""
        return adapted if self.cheap else most

    def length(self, available: int) -> int:
        """How many of `available` guesses to check in the next pass: all at the cheap cost; else the number
        that yields the most tokens per unit of cost, or 0 (a one-token pass) when none beats 1."""
        if self.cheap or available == 0:
            return available
        best, take, tokens = 1.0, 0, 1.0
        for g in range(1, available + 1):
            tokens += self.rate ** g
            value = tokens / (self.fixed + self.per_guess * g)
            if value > best:
                best, take = value, g
        return take

    def observe(self, outcomes) -> None:
        for ok in outcomes:
            self.rate += self.weight * (float(bool(ok)) - self.rate)

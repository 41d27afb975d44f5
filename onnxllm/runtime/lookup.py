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

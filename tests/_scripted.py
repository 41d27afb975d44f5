"""A real Model (tokenizer, chat template, generation loop) over a scripted session: it answers each prompt
with text chosen by `reply(prompt_text)`, then EOS. For tests of what sits above the loop (tool calls,
the server's round trips) that need a model to say something exact.

    model = scripted_model(package, lambda prompt: "<tool_call>{...}</tool_call>")
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

import onnxllm


class ScriptedSession:
    can_verify = False

    def __init__(self, tokenizer, reply: Callable[[str], str], *, eos: int, vocab: int, context: int = 256):
        self.tokenizer, self.reply, self.eos, self.vocab, self.context = tokenizer, reply, eos, vocab, context
        self.tokens: list[int] = []
        self.prompts: list[str] = []  # every prompt seen, decoded
        self._answer: list[int] | None = None

    def reserve(self, total: int) -> None:
        self._answer = None  # a new generation starts

    def common_prefix(self, ids) -> int:
        n = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            n += 1
        return n

    def rewind(self, n: int) -> None:
        self.tokens = self.tokens[:n]

    def forward(self, ids, *, all_logits: bool = False) -> np.ndarray:
        self.tokens.extend(ids)
        if self._answer is None:
            prompt = self.tokenizer.decode(self.tokens, skip_special_tokens=False)
            self.prompts.append(prompt)
            self._answer = self.tokenizer.encode(self.reply(prompt), add_special_tokens=False).ids + [self.eos]
        logits = np.zeros(self.vocab, dtype=np.float32)
        logits[self._answer.pop(0) if self._answer else self.eos] = 10.0
        return logits


def scripted_model(package: Path, reply: Callable[[str], str]):
    model = onnxllm.load(package)
    model.session = ScriptedSession(model.tokenizer, reply, eos=model.manifest.eos_token_ids[0],
                                    vocab=model.manifest.architecture.vocab_size, context=model.session.context)
    return model

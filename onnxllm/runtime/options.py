"""The keyword overrides every generation call takes, typed: the fields of GenerationConfig, all optional.

`Model.generate(prompt, max_tokens=64, seed=1)` reads as a call, not a config object; declaring
the keywords here (PEP 692 `Unpack`) lets type checkers and editors see them through each layer.
A test keeps this list equal to GenerationConfig's fields; unknown names still fail at run time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict


class GenerationOptions(TypedDict, total=False):
    max_tokens: int | None
    temperature: float | None
    top_k: int | None
    top_p: float | None
    min_p: float | None
    repetition_penalty: float | None
    presence_penalty: float | None
    frequency_penalty: float | None
    seed: int | None
    stop: str | Sequence[str] | None
    context_overflow: str | None
    draft_tokens: int | None
    min_tokens: int | None
    ignore_eos: bool | None
    logprobs: bool | None
    top_logprobs: int | None
    json_schema: str | None
    regex: str | None
    grammar: str | None
    json_object: bool | None

"""Generation in three thin layers: token generator -> text stream -> blocking call.

`generate_tokens` drives a session (prefill, then decode steps: one token each, or a speculative
check of tokens drafted by prompt lookup) and knows nothing about text; `stream_text` turns its
tokens into UTF-8-safe text deltas and applies stop strings; the Model's `generate` just collects
the stream.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field, fields, replace
from typing import Iterator, Protocol, Sequence

import numpy as np

from ..errors import GenerationError
from .constraints import Constraint, ConstraintSpec, constraint_spec, schema_text
from .detokenizer import StreamingDetokenizer
from .lookup import CHEAP_VERIFY, DraftGate, PromptLookup
from .sampling import (
    TokenLogprobs,
    make_logits_processor,
    make_logprobs,
    make_sampler,
    make_verifier,
    validate_sampling,
)

FINISH_REASONS = ("stop", "length", "eos", "cancelled")


@dataclass(frozen=True)
class GenerationConfig:
    """Every generation option; the package's generation_config.json provides the defaults."""

    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # "error": prompt + max_tokens beyond the context is an error; "truncate": chats drop oldest turns.
    context_overflow: str = "error"
    # Speculative decoding by prompt lookup (lookup.py): up to this many tokens guessed from earlier text
    # and checked in one pass; the model's own logits decide every token, so the output keeps the
    # model's distribution. Greedy fp32 gives the same tokens as without drafts; quantized variants round
    # a pass over several tokens differently from one-token passes (int8-dynamic quantizes a pass's
    # activations with one scale), so a greedy answer can part from the draft-free one at a near tie,
    # equally close to fp32 (docs/BENCHMARKS.md). A seed reproduces a sample for the same settings, not
    # across draft_tokens. 0 turns it off.
    draft_tokens: int = 8
    # Log-probabilities on each Chunk: the chosen token's, in the distribution it was drawn from, and the
    # top_logprobs most likely tokens (top_logprobs > 0 turns logprobs on too).
    logprobs: bool = False
    top_logprobs: int = 0
    # Structured output (constraints.py, needs onnxllm[structured]), one at a time: a JSON schema (a dict,
    # JSON text or a pydantic model class), a regular expression, a grammar (Lark or GBNF), or
    # json_object=True for any JSON object. Tokens outside it are masked under every sampling setting.
    json_schema: str | None = None
    regex: str | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self):
        object.__setattr__(self, "json_schema", schema_text(self.json_schema))  # frozen: a dict would be mutable

    def constraint(self) -> ConstraintSpec | None:
        """The structured-output constraint asked for, or None; ConstraintError when two are given."""
        return constraint_spec(json_schema=self.json_schema, regex=self.regex, grammar=self.grammar,
                               json_object=self.json_object)
    # Exact lengths (benchmarks, fixed-size outputs), as vLLM's options of the same names: before
    # `min_tokens` tokens the EOS ids cannot be chosen (their logits are -inf); `ignore_eos` makes EOS an
    # ordinary token that does not end generation, so it runs to max_tokens or a stop string.
    min_tokens: int = 0
    ignore_eos: bool = False

    def updated(self, **options) -> "GenerationConfig":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise GenerationError(f"unknown generation option(s) {unknown}; valid: {sorted(known)}")
        options = {k: v for k, v in options.items() if v is not None}
        if isinstance(options.get("stop"), str):
            options["stop"] = (options["stop"],)
        if "stop" in options:
            options["stop"] = tuple(options["stop"])
        return replace(self, **options)

    def validate(self) -> "GenerationConfig":
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise GenerationError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        validate_sampling(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise GenerationError(f"{name} must be a finite number, got {value!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationError("stop strings must be non-empty strings")
        draft = self.draft_tokens
        if isinstance(draft, bool) or not isinstance(draft, int) or not 0 <= draft <= 64:
            raise GenerationError(f"draft_tokens must be an integer from 0 (off) to 64, got {self.draft_tokens!r}")
        if isinstance(self.top_logprobs, bool) or not isinstance(self.top_logprobs, int) \
                or not 0 <= self.top_logprobs <= 20:
            raise GenerationError(f"top_logprobs must be an integer from 0 to 20, got {self.top_logprobs!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise GenerationError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise GenerationError(f"min_tokens ({self.min_tokens}) is more than max_tokens ({self.max_tokens}); "
                                  "lower min_tokens or raise max_tokens")
        if not isinstance(self.ignore_eos, bool):
            raise GenerationError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if (self.min_tokens or self.ignore_eos) and self.constraint() is not None:
            # The constraint decides where the answer ends (EOS once the document is complete); holding EOS back
            # there would leave no token the grammar allows.
            raise GenerationError("min_tokens and ignore_eos cannot be combined with json_schema, json_object, regex "
                                  "or grammar: the constraint decides where the answer ends; drop one of them")
        if self.context_overflow not in ("error", "truncate"):
            raise GenerationError(f"context_overflow must be 'error' or 'truncate', got {self.context_overflow!r}")
        self.constraint()
        return self


@dataclass(frozen=True)
class Timings:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the KV cache, not prefilled again
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_passes: int = 0  # model calls after the prefill: generated - 1 without drafts, fewer with
    drafted_tokens: int = 0  # tokens guessed by prompt lookup and checked
    accepted_tokens: int = 0  # of those, the ones the model agreed with and that were given out

    @property
    def time_to_first_token_s(self) -> float:
        return self.prefill_s

    @property
    def prefill_tokens_per_s(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # the first token comes from prefill; decode steps made the rest
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
            "generated_tokens": self.generated_tokens, "prefill_s": round(self.prefill_s, 4),
            "decode_s": round(self.decode_s, 4), "time_to_first_token_s": round(self.time_to_first_token_s, 4),
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 1),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 1),
            "decode_passes": self.decode_passes, "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
        }


@dataclass(frozen=True)
class Chunk:
    """One piece of a stream: a text delta and the token that made it; the last carries finish_reason."""

    text: str
    token: int | None
    finish_reason: str | None = None
    timings: Timings | None = None
    tool_calls: tuple = ()  # ToolCalls completed by this chunk (only when tools were given)
    logprobs: "Logprob | None" = None  # the token's log-probability (only when asked for)


@dataclass(frozen=True)
class Logprob:
    """A generated token's log-probability, and the most likely tokens at that step, with their text."""

    token: int
    text: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (token, text, logprob), best first


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    timings: Timings = field(default_factory=Timings)
    tool_calls: list = field(default_factory=list)  # ToolCalls the model made (only when tools were given)
    logprobs: list[Logprob] = field(default_factory=list)  # one per token (only when asked for)


class Session(Protocol):
    """What the generator needs from a decoder session (a fake with scripted logits fits too)."""

    tokens: list[int]  # what the cache holds, position by position
    context: int  # the most tokens it can hold
    can_verify: bool  # forward(ids, all_logits=True) and rewind are cheap: prompt-lookup drafts pay
    # optional: a verify pass's cost in one-token passes, (fixed, per guess) (lookup.verify_cost); default cheap
    # verify_cost: tuple[float, float]

    def forward(self, ids: Sequence[int], *, all_logits: bool = False) -> np.ndarray: ...
    def common_prefix(self, ids: Sequence[int]) -> int: ...
    def rewind(self, n: int) -> None: ...
    def reserve(self, total: int) -> None: ...


@dataclass
class TokenEvent:
    token: int | None
    finish_reason: str | None
    timings: Timings
    logprobs: TokenLogprobs | None = None


class TokenPicker:
    """Chooses tokens from logits: the penalties over what came before, then the sampler or the draft check.

    `pending` is what a pass has chosen but not yet given out (it counts for the penalties)."""

    def __init__(self, config: GenerationConfig, prompt_ids: Sequence[int], *,
                 constraint: Constraint | None = None, eos_ids: Sequence[int] = ()):
        rng = np.random.default_rng(config.seed)
        options = {"temperature": config.temperature, "top_k": config.top_k, "top_p": config.top_p,
                   "min_p": config.min_p, "rng": rng}
        self._sample, self._verify = make_sampler(**options), make_verifier(**options)
        self._process = make_logits_processor(repetition_penalty=config.repetition_penalty,
                                              presence_penalty=config.presence_penalty,
                                              frequency_penalty=config.frequency_penalty)
        self._penalties = (config.repetition_penalty != 1.0 or config.presence_penalty != 0.0
                           or config.frequency_penalty != 0.0)
        self.prompt_len = len(prompt_ids)
        self.history = list(prompt_ids)  # prompt + tokens given out
        self._score = None
        if config.logprobs or config.top_logprobs > 0:
            self._score = make_logprobs(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                                        min_p=config.min_p, top_n=config.top_logprobs)
        self.scores: list[TokenLogprobs] = []  # with logprobs: one per token chosen since the last take_scores
        self.constraint = constraint  # structured output: masks what would leave it, after the penalties

        self._min_tokens = config.min_tokens
        self._eos = np.asarray(sorted(set(eos_ids)), dtype=np.int64)

    def processed(self, logits: np.ndarray, pending: Sequence[int]) -> np.ndarray:
        out = self._process(logits, self.history + list(pending), self.prompt_len) if self._penalties else logits
        # The token chosen from these logits is number len(history) - prompt_len + len(pending) (from 0).
        if self._eos.size and len(self.history) - self.prompt_len + len(pending) < self._min_tokens:
            out = np.array(out, copy=True)
            out[self._eos[self._eos < out.shape[-1]]] = -np.inf
        if self.constraint is None:
            return out
        return self.constraint.process(out, self.history[self.prompt_len:] + list(pending))

    def draft(self, guesses: list[int], room: int) -> list[int]:
        """Under a constraint: the tokens it forces next when there are any (a key, a separator), else the
        guesses cut before the first that leaves it; the model checks either like any draft."""
        if self.constraint is None:
            return guesses
        generated = self.history[self.prompt_len:]
        forced = self.constraint.forced(generated)[:room]
        return forced if forced else guesses[:self.constraint.valid_prefix(generated, guesses)]

    def pick(self, logits: np.ndarray, pending: Sequence[int] = ()) -> int:
        row = self.processed(logits, pending)
        return self._scored(row, self._sample(row))

    def check(self, logits: np.ndarray, pending: Sequence[int], guess: int) -> tuple[int, bool]:
        """(token, accepted): the guess when the model agrees, else the token that replaces it."""
        row = self.processed(logits, pending)
        token, ok = self._verify(row, guess)
        return self._scored(row, token), ok

    def _scored(self, row: np.ndarray, token: int) -> int:
        # Scored from the very logits the token was drawn from (after the penalties and any constraint).
        if self._score is not None:
            self.scores.append(self._score(row, token))
        return token

    def take_scores(self) -> list[TokenLogprobs]:
        """The log-probabilities of the tokens chosen since the last call (empty without logprobs)."""
        scores, self.scores = self.scores, []
        return scores

    def given_out(self, token: int) -> None:
        self.history.append(token)


def prefill(session: Session, ids: Sequence[int]) -> np.ndarray:
    """Feed the prompt's uncached tokens (S of them, chunked by the session); logits of the last: (vocab,)."""
    return session.forward(ids)


def decode_one_token(session: Session, last: int, picker: TokenPicker) -> list[int]:
    """Feed the last token given out (1 position); the next token, chosen from its logits."""
    return [picker.pick(session.forward([last]))]


def verify_draft(session: Session, last: int, draft: Sequence[int], picker: TokenPicker) -> list[int]:
    """Feed `last` and the guesses in one pass (1 + len(draft) positions, logits for each); the accepted
    guesses, then the model's own token after them (the replacement of the first rejected guess, or the
    token after the whole draft). The cache is rewound past a rejected guess."""
    base = len(session.tokens)
    rows = session.forward([last, *draft], all_logits=True)  # rows[i]: the logits after draft[:i]  (1 + G, vocab)
    pending: list[int] = []
    for i, guess in enumerate(draft):
        token, ok = picker.check(rows[i], pending, guess)
        pending.append(token)
        if not ok:
            session.rewind(base + 1 + i)  # drop the rejected guess and those after it
            return pending
    pending.append(picker.pick(rows[-1], pending))
    return pending


def generate_tokens(session: Session, prompt_ids: Sequence[int], config: GenerationConfig, *,
                    eos_ids: Sequence[int] = (), cancel: threading.Event | None = None,
                    constraint: Constraint | None = None) -> Iterator[TokenEvent]:
    """Prefill `prompt_ids` (reusing the cached prefix), then decode until eos, max_tokens or cancel.

    Each decode pass feeds the last token, plus, with `config.draft_tokens`, the tokens prompt lookup
    guesses will follow it; the logits at each fed position accept a guess or give the token that
    replaces it, and the cache is rewound past the first rejected guess. The draft length adapts: two
    more after a pass that accepted all, one fewer after a miss (as in transformers' assisted decoding).
    The last event has token None and a finish_reason: eos, length or cancelled. With a `constraint`
    (structured output) every pick is masked to it, and drafts are the tokens it forces or guesses it allows.
    """
    if not prompt_ids:
        raise GenerationError("the prompt is empty; give at least one token of input")
    prompt_ids = list(prompt_ids)
    session.reserve(len(prompt_ids) + config.max_tokens)
    # Reuse the KV cache for the longest common prefix; at least one token must be fed for logits.
    cached = min(session.common_prefix(prompt_ids), len(prompt_ids) - 1)
    session.rewind(cached)
    picker = TokenPicker(config, prompt_ids, constraint=constraint, eos_ids=eos_ids)
    lookup = PromptLookup(prompt_ids) if config.draft_tokens and session.can_verify else None
    gate = DraftGate(getattr(session, "verify_cost", CHEAP_VERIFY))  # whether a draft is worth its pass
    draft_len = min(4, config.draft_tokens)
    # Drafts are not cut short near max_tokens (the passes, and so their rounding, stay the same whatever
    # max_tokens is; surplus tokens are dropped), only by the context: room for them is reserved now.
    if lookup is not None:
        session.reserve(min(session.context, len(prompt_ids) + config.max_tokens + config.draft_tokens))
    eos = set() if config.ignore_eos else set(eos_ids)
    generated = passes = drafted = accepted = 0
    guessed = 0  # how many of `pending` are accepted guesses (they come first)

    def timings(prefill_s: float, decode_s: float) -> Timings:
        return Timings(len(prompt_ids), cached, generated, prefill_s, decode_s, passes, drafted, accepted)

    start = time.perf_counter()
    if cancel is not None and cancel.is_set():
        yield TokenEvent(None, "cancelled", timings(0.0, 0.0))
        return
    logits = prefill(session, prompt_ids[cached:])
    prefill_s = time.perf_counter() - start
    decode_start = time.perf_counter()
    pending = [picker.pick(logits)]  # tokens chosen, not yet given out
    scores = picker.take_scores()  # their log-probabilities, when asked for
    while True:
        for j, token in enumerate(pending):
            if token in eos:
                yield TokenEvent(None, "eos", timings(prefill_s, time.perf_counter() - decode_start))
                return
            generated += 1
            accepted += j < guessed
            picker.given_out(token)
            if lookup is not None:
                lookup.append(token)
            yield TokenEvent(token, None, timings(prefill_s, time.perf_counter() - decode_start),
                             scores[j] if scores else None)
            if generated >= config.max_tokens:
                yield TokenEvent(None, "length", timings(prefill_s, time.perf_counter() - decode_start))
                return
            if cancel is not None and cancel.is_set():
                yield TokenEvent(None, "cancelled", timings(prefill_s, time.perf_counter() - decode_start))
                return
        last = pending[-1]  # given out, not yet in the cache
        room = min(gate.reach(draft_len, config.draft_tokens), session.context - len(session.tokens) - 1)
        guesses = picker.draft(lookup.draft(room), room) if lookup is not None else []
        draft = guesses[:gate.length(len(guesses))]
        passes += 1
        if not draft:
            pending, guessed = decode_one_token(session, last, picker), 0
            scores = picker.take_scores()
            if guesses:  # held back: was its first guess right?
                gate.observe([pending[0] == guesses[0]])
            continue
        pending = verify_draft(session, last, draft, picker)
        scores = picker.take_scores()
        drafted += len(draft)
        guessed = len(pending) - 1
        gate.observe([True] * guessed + [False] * (guessed < len(draft)))
        draft_len = min(draft_len + 2, config.draft_tokens) if len(pending) > len(draft) else max(1, draft_len - 1)


def _stop_hit(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in text, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still grow into a stop string (must not be shown yet)."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = max(keep, n)
                break
    return keep


def _with_text(scored: TokenLogprobs | None, tokenizer) -> Logprob | None:
    if scored is None:
        return None

    def text(token: int) -> str:
        return tokenizer.decode([token], skip_special_tokens=False)

    return Logprob(scored.token, text(scored.token), scored.logprob, tuple((t, text(t), lp) for t, lp in scored.top))


def stream_text(events: Iterator[TokenEvent], tokenizer, config: GenerationConfig) -> Iterator[Chunk]:
    """Text deltas from token events; cuts exactly at the first stop string."""
    detok = StreamingDetokenizer(tokenizer)
    pending = ""  # decoded but not yet shown, because it may be the start of a stop string
    for event in events:
        if event.token is None:
            tail = pending + detok.flush()
            hit = _stop_hit(tail, config.stop) if config.stop else None
            if hit is not None:
                yield Chunk(tail[:hit], None, "stop", event.timings)
            else:
                yield Chunk(tail, None, event.finish_reason, event.timings)
            return
        pending += detok.add(event.token)
        if config.stop:
            hit = _stop_hit(pending, config.stop)
            if hit is not None:
                yield Chunk(pending[:hit], event.token, None, logprobs=_with_text(event.logprobs, tokenizer))
                yield Chunk("", None, "stop", event.timings)
                events.close()
                return
            shown = len(pending) - _held_back(pending, config.stop)
            delta, pending = pending[:shown], pending[shown:]
        else:
            delta, pending = pending, ""
        yield Chunk(delta, event.token, None, logprobs=_with_text(event.logprobs, tokenizer))

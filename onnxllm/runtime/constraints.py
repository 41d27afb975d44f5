"""Structured output: a JSON schema, a regular expression or a grammar, held to token by token.

llguidance (the engine onnxruntime-genai and llama.cpp use) compiles the constraint against the
model's own tokenizer into a matcher. Here the matcher becomes a logits processor, as the penalties
are: every token that would leave the constraint gets ``-inf``, so whatever the sampler does next
(greedy, temperature, top-k/p, min-p) it can only pick a token that keeps the text valid, and EOS
only where the text is complete. Prompt-lookup drafts are cut at the first guess that leaves the
constraint, and the tokens the grammar forces (a key, ``": "``) are offered as drafts.

This module knows the tokenizer and the constraint, never the session or the loop. llguidance is
an optional dependency (``pip install 'onnxllm[structured]'``), imported only when a constraint is
asked for.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import ConstraintError

__all__ = ["Constraint", "ConstraintCompiler", "ConstraintSpec", "constraint_spec", "schema_text", "tool_call_grammar"]

INSTALL_HINT = "pip install 'onnxllm[structured]'"
KINDS = ("json_schema", "regex", "grammar")
# One-line JSON with the usual separators: flexible whitespace lets a small model pad a document with
# newlines until max_tokens; a schema's own "x-guidance" options still win over these.
_JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_ANY_OBJECT = '{"type": "object"}'


@dataclass(frozen=True)
class ConstraintSpec:
    """What the output must match: kind is json_schema (JSON text), regex or grammar (Lark or GBNF)."""

    kind: str
    text: str
    lenient: bool = False  # json_schema only: ignore keywords llguidance does not implement


def schema_text(schema: Any) -> str | None:
    """A JSON schema given as a dict, JSON text or a pydantic model class -> JSON text (order kept)."""
    if schema is None or isinstance(schema, str):
        return schema
    to_schema = getattr(schema, "model_json_schema", None)
    if callable(to_schema):  # a pydantic model class
        schema = to_schema()
    if not isinstance(schema, dict):
        raise ConstraintError(f"json_schema must be a dict, JSON text or a pydantic model, got {type(schema).__name__}")
    try:
        return json.dumps(schema, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ConstraintError(f"json_schema cannot be written as JSON: {exc}") from None


def constraint_spec(*, json_schema: str | None = None, regex: str | None = None, grammar: str | None = None,
                    json_object: bool = False, lenient: bool = False) -> ConstraintSpec | None:
    """Check that at most one constraint is given and that it has the right type; None when there is none."""
    if not isinstance(json_object, bool):
        raise ConstraintError(f"json_object must be True or False, got {json_object!r}")
    given = [name for name, value in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar),
                                      ("json_object", json_object or None)) if value is not None]
    if len(given) > 1:
        raise ConstraintError(f"give one constraint at a time, got {' and '.join(given)}")
    if not given:
        return None
    if json_object:
        return ConstraintSpec("json_schema", _ANY_OBJECT, lenient)
    kind = given[0]
    text = {"json_schema": json_schema, "regex": regex, "grammar": grammar}[kind]
    if not isinstance(text, str) or not text.strip():
        raise ConstraintError(f"{kind} must be a non-empty string, got {text!r}")
    if kind == "json_schema":
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConstraintError(f"json_schema is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") \
                from None
        if not isinstance(parsed, (dict, bool)):
            raise ConstraintError(f"json_schema must be a JSON object, got {type(parsed).__name__}")
    return ConstraintSpec(kind, text, lenient)


def tool_call_grammar(tools: Sequence[dict], *, start: str, end: str | None, arguments_key: str = "arguments",
                      name: str | None = None) -> str:
    """A Lark grammar for exactly one call to one of `tools` (to `name` only, when given), written as the model's
    format writes it: ``start {"name": ..., arguments_key: {...}} end`` (no markers for formats whose call is the
    whole answer: their parsers take the bare JSON). The arguments follow each tool's parameters schema."""
    chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not chosen:
        raise ConstraintError(f"tool_choice names {name!r}, which is not among the tools given "
                              f"({', '.join(t['function']['name'] for t in tools)})")
    calls = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                               arguments_key: f.get("parameters") or {"type": "object"}},
              "required": ["name", arguments_key], "additionalProperties": False} for f in chosen]
    schema = {"x-guidance": _JSON_DEFAULTS, **(calls[0] if len(calls) == 1 else {"anyOf": calls})}
    call = f"call: %json {json.dumps(schema, ensure_ascii=False)}"
    if end is None:
        return f"start: call\n{call}"
    return f"start: {json.dumps(start)} \"\\n\" call \"\\n\" {json.dumps(end)}\n{call}"


def _one_line(message: str, limit: int = 300) -> str:
    """llguidance's errors quote the source with a caret under it over several lines; keep the words."""
    lines = [ln.strip() for ln in str(message).splitlines()]
    words = [ln for ln in lines if ln and not set(ln) <= {"^", " "} and not re.match(r"^\d+ \|", ln)]
    text = " ".join(words) or str(message).strip()
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401  (the mask helpers live in this submodule)
    except ImportError:
        raise ConstraintError(f"json_schema, regex and grammar need llguidance, which is not installed: "
                              f"{INSTALL_HINT}") from None
    return llguidance


class ConstraintCompiler:
    """The model's tokenizer as llguidance sees it; built once per model (~0.6 s for 49k tokens).

    ``n_vocab`` is the model's logits width (it may exceed the tokenizer's: those ids are never allowed).
    """

    def __init__(self, tokenizer, *, n_vocab: int, eos_ids: Sequence[int]):
        llg = _llguidance()
        if not eos_ids:
            raise ConstraintError("this model declares no EOS token, so a constrained answer could never end; "
                                  "add eos_token_ids to its manifest")
        spec = json.loads(tokenizer.to_str())
        spec["padding"] = spec["truncation"] = None  # llguidance tokenizes single texts
        try:
            self.tokenizer = llg.LLTokenizer(json.dumps(spec), n_vocab=n_vocab, eos_token=list(eos_ids))
        except (ValueError, RuntimeError) as exc:
            raise ConstraintError(f"llguidance cannot use this model's tokenizer: {_one_line(exc)}") from None
        self.n_vocab = n_vocab
        self.eos_ids = tuple(eos_ids)
        self._llg = llg

    def grammar(self, spec: ConstraintSpec) -> str:
        """The llguidance grammar of a spec, checked against the tokenizer; ConstraintError names the problem."""
        matcher_cls = self._llg.LLMatcher
        try:
            if spec.kind == "json_schema":
                options = {**_JSON_DEFAULTS, "lenient": spec.lenient}
                grammar = matcher_cls.grammar_from_json_schema(spec.text, defaults=options)
            elif spec.kind == "regex":
                grammar = matcher_cls.grammar_from_regex(spec.text)
            elif spec.kind == "grammar":
                from llguidance.gbnf_to_lark import any_to_lark

                grammar = matcher_cls.grammar_from_lark(any_to_lark(spec.text))
            else:
                raise ConstraintError(f"unknown constraint kind {spec.kind!r}; valid: {', '.join(KINDS)}")
        except ConstraintError:
            raise
        except Exception as exc:  # llguidance raises ValueError, its GBNF converter GbnfToLarkError
            raise ConstraintError(f"invalid {spec.kind.replace('_', ' ')}: {_one_line(exc)}") from None
        failed, messages = matcher_cls.validate_grammar_with_warnings(grammar, self.tokenizer)
        if failed:
            raise ConstraintError(f"invalid {spec.kind.replace('_', ' ')}: {_one_line(messages[0])}")
        return grammar

    def compile(self, spec: ConstraintSpec) -> "Constraint":
        """A fresh matcher for one generation (compiling a schema takes about a millisecond)."""
        grammar = self.grammar(spec)
        matcher = self._llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"invalid {spec.kind.replace('_', ' ')}: {_one_line(matcher.get_error())}")
        return Constraint(matcher, n_vocab=self.n_vocab, eos_ids=self.eos_ids,
                          fill=self._llg.numpy.fill_next_token_bitmask)


class Constraint:
    """One generation's matcher, kept in step with the tokens generated so far.

    Every call takes ``generated`` (this call's tokens, chosen so far, in order); the matcher consumes
    what is new and rolls back what was dropped, so callers never track its state.
    """

    def __init__(self, matcher, *, n_vocab: int, eos_ids: Sequence[int], fill):
        self._matcher = matcher
        self._fill = fill
        self._tokens: list[int] = []  # what the matcher has consumed
        self._bits = np.zeros((1, (n_vocab + 31) // 32), dtype=np.int32)  # one bit per token id
        self.n_vocab = n_vocab
        self.eos_ids = frozenset(eos_ids)

    def _sync(self, generated: Sequence[int]) -> None:
        mine = self._tokens
        keep = len(mine) if list(generated[:len(mine)]) == mine else _common_prefix(mine, generated)
        if keep < len(mine):
            self._matcher.rollback(len(mine) - keep)
            del mine[keep:]
        for token in generated[keep:]:
            if not self._matcher.consume_token(int(token)):
                why = _one_line(self._matcher.get_error())
                raise ConstraintError(f"token {token} does not fit the constraint ({why})")
            mine.append(int(token))

    def allowed(self, generated: Sequence[int]) -> np.ndarray:
        """Boolean mask over the logits: True where the next token keeps the output valid."""
        self._sync(generated)
        if _ended(self._tokens, self.eos_ids):  # nothing after an EOS is ever given out
            mask = np.zeros(self.n_vocab, dtype=bool)
            mask[list(self.eos_ids)] = True
            return mask
        self._fill(self._matcher, self._bits)
        return np.unpackbits(self._bits.view(np.uint8), count=self.n_vocab, bitorder="little").view(bool)

    def process(self, logits: np.ndarray, generated: Sequence[int]) -> np.ndarray:
        """The logits with every token outside the constraint at ``-inf`` (a new array)."""
        mask = self.allowed(generated)
        if logits.shape[-1] != self.n_vocab:
            raise ConstraintError(f"the model gives {logits.shape[-1]} logits but the constraint was built for "
                                  f"{self.n_vocab}; rebuild it for this model")
        if not mask.any():
            raise ConstraintError("the constraint allows no next token (the matcher is stuck); "
                                  "simplify the schema or grammar")
        return np.where(mask, logits, np.asarray(-np.inf, dtype=logits.dtype))

    def valid_prefix(self, generated: Sequence[int], draft: Sequence[int]) -> int:
        """How many of the draft's tokens, after ``generated``, stay inside the constraint (EOS never counts:
        the model's own pick decides where the answer ends)."""
        self._sync(generated)
        if not draft:
            return 0
        n = self._matcher.validate_tokens([int(t) for t in draft])
        for i, token in enumerate(draft[:n]):
            if token in self.eos_ids:
                return i
        return n

    def forced(self, generated: Sequence[int]) -> list[int]:
        """Tokens the constraint forces next (a key, a separator); good drafts, since the model must agree."""
        self._sync(generated)
        if _ended(self._tokens, self.eos_ids):
            return []
        return [t for t in self._matcher.compute_ff_tokens() if t not in self.eos_ids]

    def is_accepting(self, generated: Sequence[int]) -> bool:
        """Whether the output so far is complete (the constraint could end here)."""
        self._sync(generated)
        return bool(self._matcher.is_accepting())


def _ended(tokens: Sequence[int], eos_ids: frozenset) -> bool:
    return bool(tokens) and tokens[-1] in eos_ids


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

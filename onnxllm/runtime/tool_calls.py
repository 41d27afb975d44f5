"""Tool calls in a model's text: one format per chat-template family, as data, and one parser over the stream.

A format says which markers open and close a call and where the arguments are; the family is read
from the chat template's own text (the template that renders tools also shows the model its call
syntax). The parser sits above the token stream (it sees text deltas, never logits): text outside
calls streams through, a call is held until it is complete and valid, and anything that does not
parse as a call to one of the given tools stays text.

    Hermes / Qwen:  <tool_call>{"name": "f", "arguments": {...}}</tool_call>   (between text)
    Llama 3.x:      <|python_tag|>{"name": "f", "parameters": {...}}           (the whole answer)
    Mistral:        [TOOL_CALLS][{"name": "f", "arguments": {...}}]           (the whole answer)
                    [TOOL_CALLS]f[ARGS]{...}                                   (newer tokenizers)

Control-token markers (`<|python_tag|>`, `[TOOL_CALLS]`) are dropped by detokenization, so the
whole-answer formats also accept the bare JSON.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

from ..errors import GenerationError


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)

    def as_message(self) -> dict:
        """The assistant-message form chat templates take back (transformers' shape)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolCallFormat:
    name: str
    detect: tuple[str, ...]  # text in a chat template that marks this family (any one)
    start: str  # opens a call
    end: str | None  # closes it; None: the call runs to the end of the answer
    whole_answer: bool  # the call is the whole answer (so bare JSON at its start is a call too)
    arguments_keys: tuple[str, ...] = ("arguments",)
    args_marker: str | None = None  # Mistral's newer "name[ARGS]{...}" form


FORMATS: tuple[ToolCallFormat, ...] = (
    ToolCallFormat("hermes", detect=("<tool_call>",), start="<tool_call>", end="</tool_call>", whole_answer=False),
    ToolCallFormat("mistral", detect=("[TOOL_CALLS]",), start="[TOOL_CALLS]", end=None, whole_answer=True,
                   args_marker="[ARGS]"),
    ToolCallFormat("llama3", detect=("<|python_tag|>", '"parameters"'), start="<|python_tag|>", end=None,
                   whole_answer=True, arguments_keys=("parameters", "arguments")),
)


def format_for_template(source: str | None) -> ToolCallFormat | None:
    """The tool-call format a chat template teaches its model, or None when the template takes no tools."""
    if not source or not re.search(r"\btools\b", source):
        return None
    return next((f for f in FORMATS if any(marker in source for marker in f.detect)), None)


def check_tools(tools: Sequence[dict] | None) -> list[dict] | None:
    """OpenAI-shaped tool definitions ({"type": "function", "function": {"name", ...}}), checked early."""
    if tools is None:
        return None
    if isinstance(tools, (str, bytes, dict)) or not isinstance(tools, Sequence):
        raise GenerationError("tools must be a list of {'type': 'function', 'function': {'name': ...}} dicts")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise GenerationError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                                  "'parameters': {...}}}}}")
    return list(tools)


def _load_json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


class _Calls:
    """Turns a call's payload into ToolCalls; None when it is not a valid call to a known tool."""

    def __init__(self, fmt: ToolCallFormat, names: set[str]):
        self.fmt, self.names = fmt, names

    def one(self, data) -> ToolCall | None:
        if not isinstance(data, dict) or data.get("name") not in self.names:
            return None
        for key in self.fmt.arguments_keys:
            if key in data:
                args = data[key]
                if isinstance(args, str):  # some models write the arguments as a JSON string
                    args = _load_json(args)
                return ToolCall(data["name"], args) if isinstance(args, dict) else None
        return ToolCall(data["name"], {}) if set(data) == {"name"} else None

    def parse(self, payload: str) -> list[ToolCall] | None:
        text = payload.strip()
        if not text:
            return None
        if self.fmt.args_marker and self.fmt.args_marker in text and not text.startswith(("[", "{")):
            return self._named(text)
        data = _load_json(text)
        if data is None and self.fmt.whole_answer:
            # Llama writes several calls separated by ";" (or one per line)
            parts = [p for p in re.split(r";\s*|\n+", text) if p.strip()]
            data = [_load_json(p) for p in parts] if len(parts) > 1 else None
            if data is not None and any(d is None for d in data):
                return None
        items = data if isinstance(data, list) else [data]
        calls = [self.one(item) for item in items]
        return calls if calls and all(calls) else None

    def _named(self, text: str) -> list[ToolCall] | None:
        calls = []
        for piece in text.split(self.fmt.start):
            name, marker, args = piece.strip().partition(self.fmt.args_marker)
            call = self.one({"name": name.strip(), "arguments": _load_json(args)}) if marker else None
            if call is None:
                return None
            calls.append(call)
        return calls or None


class ToolCallParser:
    """Feed text deltas, get (visible text, finished calls) back; `finish()` at the end of the answer."""

    def __init__(self, fmt: ToolCallFormat, tool_names: Sequence[str]):
        self.fmt = fmt
        self.calls = _Calls(fmt, set(tool_names))
        self._buffer = ""  # text not shown yet: a possible marker, or a call in progress
        self._in_call = False
        self._started = False  # something other than whitespace has been seen

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buffer += text
        shown: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if not self._started:
                stripped = self._buffer.lstrip()
                if not stripped:
                    return "".join(shown), calls
                self._started = True
                if self.fmt.whole_answer and (stripped.startswith(("{", "[")) or self.fmt.start.startswith(stripped)
                                              or stripped.startswith(self.fmt.start)):
                    self._in_call = True  # hold the whole answer: it is a call or it is text, known at the end
            if self._in_call:
                if self.fmt.end is None:
                    return "".join(shown), calls
                start = self._buffer.find(self.fmt.start)
                close = self._buffer.find(self.fmt.end, start + len(self.fmt.start))
                if close < 0:
                    return "".join(shown), calls
                raw = self._buffer[:close + len(self.fmt.end)]
                self._buffer = self._buffer[len(raw):]
                self._in_call = False
                parsed = self.calls.parse(raw[start + len(self.fmt.start):close])
                if parsed is None:
                    shown.append(raw)
                else:
                    calls.extend(parsed)
                continue
            at = self._buffer.find(self.fmt.start)
            if at >= 0:
                shown.append(self._buffer[:at])
                self._buffer = self._buffer[at:]
                self._in_call = True
                continue
            keep = _partial_suffix(self._buffer, self.fmt.start)
            shown.append(self._buffer[:len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep:]
            return "".join(shown), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        rest, self._buffer = self._buffer, ""
        if not self._in_call:
            return rest, []
        self._in_call = False
        payload = rest.lstrip()
        if payload.startswith(self.fmt.start):
            payload = payload[len(self.fmt.start):]
        if self.fmt.end is not None:
            return rest, []  # a call opened and never closed: the text as written
        parsed = self.calls.parse(payload)
        return (rest, []) if parsed is None else ("", parsed)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker` (could still become it)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def parse_tool_calls(text: str, fmt: ToolCallFormat, tool_names: Sequence[str]) -> tuple[str, list[ToolCall]]:
    """The whole answer at once: (text outside calls, calls)."""
    parser = ToolCallParser(fmt, tool_names)
    shown, calls = parser.feed(text)
    rest, more = parser.finish()
    return shown + rest, calls + more


def filter_tool_calls(chunks: Iterator, fmt: ToolCallFormat, tool_names: Sequence[str]) -> Iterator:
    """A Chunk stream with call text taken out of `text` and the calls on the chunk that completes them."""
    parser = ToolCallParser(fmt, tool_names)
    for chunk in chunks:
        text, calls = parser.feed(chunk.text)
        if chunk.finish_reason is not None:
            rest, more = parser.finish()
            text, calls = text + rest, calls + more
        yield replace(chunk, text=text, tool_calls=tuple(calls))

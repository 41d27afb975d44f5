"""Render Hugging Face chat templates (Jinja) the way transformers does, in a sandbox.

Chat templates ship inside model packages, so they are untrusted code. They run
in ``jinja2.sandbox.ImmutableSandboxedEnvironment`` with the same options,
globals and ``tojson`` filter as transformers' ``apply_chat_template``, so the
rendered prompt is byte-identical to what the model was trained with.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from onnxllm.errors import GenerationError, InvalidPackageError

__all__ = ["ChatTemplate", "ChatVariables"]

# A template from a stranger can loop or grow without end; a chat prompt is a few hundred KB at most.
# Rendering stops past these (a line trace checks the clock; the output is counted as it is made).
MAX_RENDER_SECONDS = 2.0
MAX_RENDER_CHARS = 4 << 20

# Older Jinja releases have known sandbox escapes (CVE-2024-56201, CVE-2024-56326, CVE-2025-27516).
_MIN_JINJA = (3, 1, 6)


def _jinja_version() -> tuple[int, ...]:
    parts = []
    for piece in jinja2.__version__.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


class _TemplateRaised(TemplateError):
    """What ``raise_exception(...)`` inside a template throws (kept apart from Jinja's own errors)."""


class _RenderLimit(Exception):
    """A template ran past MAX_RENDER_SECONDS or MAX_RENDER_CHARS."""


def _bounded_render(template: jinja2.Template, context: dict[str, Any]) -> str:
    """template.render(context), stopped by _RenderLimit when it takes too long or writes too much."""
    deadline = time.monotonic() + MAX_RENDER_SECONDS

    def trace(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _RenderLimit(f"it ran for more than {MAX_RENDER_SECONDS:g} s")
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)  # this thread only, and only while rendering
    try:
        parts, size = [], 0
        for piece in template.generate(**context):
            size += len(piece)
            if size > MAX_RENDER_CHARS:
                raise _RenderLimit(f"its output passed {MAX_RENDER_CHARS} characters")
            parts.append(piece)
        return "".join(parts)
    finally:
        sys.settrace(previous)


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Same as transformers: Jinja's built-in tojson HTML-escapes and sorts keys, which templates were not trained on.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:  # noqa: A002 - name used by templates
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict`` global without the class object itself, so templates cannot reach type internals."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace`` that refuses underscore attributes (as transformers does)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"namespace attribute {name!r} starts with an underscore")


class _GenerationTag(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (used for training masks) and render the body as-is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """Sandbox that fails on any unsafe attribute lookup, not only when the result is used.

    Jinja returns a silent Undefined for ``{{ ''.__class__ }}``; a template that even looks
    at Python internals is hostile or broken, so stop it at once.
    """

    # `'x' * 10**10` or `9 ** 9 ** 9` is one C call that a line trace cannot stop: sizes are checked first.
    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if (
                    isinstance(seq, (str, list, tuple))
                    and isinstance(times, int)
                    and len(seq) * times > MAX_RENDER_CHARS
                ):
                    raise _RenderLimit(f"it repeats a {type(seq).__name__} {times} times")
            return left * right
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            if right * math.log2(abs(left)) > 1 << 16:
                raise _RenderLimit(f"it computes {left} ** {right}")
        return left ** right


def _plain(value: Any) -> Any:
    # Rebuild inputs from plain JSON-like types: rich objects carry methods the sandbox does not know
    # to block. Anything else becomes an inert "<TypeName>" placeholder, as in transformers.
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())  # np.bool_(False) would otherwise become a truthy placeholder
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


def _validate_messages(messages: Any) -> list[dict]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise GenerationError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}")
    if not messages:
        raise GenerationError("messages is empty; give at least one {'role': ..., 'content': ...} message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise GenerationError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise GenerationError(f"messages[{i}]['role'] must be a non-empty string, got {role!r}")
        content = message.get("content")
        # An assistant turn that only calls tools may have no content (OpenAI sends content=None).
        if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            raise GenerationError(f"messages[{i}]['content'] must be a string, got {type(content).__name__}")
        # Drop None values as transformers does: templates handle a missing key, not a literal None.
        out.append({k: v for k, v in message.items() if v is not None})
    return _plain(out)


@dataclasses.dataclass(frozen=True)
class ChatVariables:
    """What a template may read besides the messages, as transformers' `apply_chat_template(tools=...,
    enable_thinking=...)` passes it. None leaves a variable out, so the template's own default applies."""

    tools: Sequence[Mapping[str, Any]] | None = None  # OpenAI-style specs: {"type": "function", "function": {...}}
    enable_thinking: bool | None = None  # Qwen3's switch: False renders an empty <think></think> block

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in (("tools", self.tools), ("enable_thinking", self.enable_thinking)) if v is not None}


class ChatTemplate:
    """A compiled chat template.

    ``bos_token``/``eos_token`` are exposed to the template under those names (as
    transformers exposes the tokenizer's special tokens); ``None`` leaves them undefined.
    Raises InvalidPackageError when ``source`` is not a valid template.
    """

    __slots__ = ("_source", "_bos_token", "_eos_token", "_template")

    def __init__(self, source: str, *, bos_token: str | None = None, eos_token: str | None = None) -> None:
        if not isinstance(source, str) or not source.strip():
            raise InvalidPackageError(
                "chat template is empty or not a string; the package's tokenizer config is broken")
        if _jinja_version() < _MIN_JINJA:
            raise GenerationError(
                f"jinja2 {jinja2.__version__} has known sandbox escapes; chat templates need jinja2>=3.1.6 "
                "(pip install -U jinja2)"
            )
        self._source = source
        self._bos_token = bos_token
        self._eos_token = eos_token
        env = _StrictSandbox(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        env.globals["dict"] = _TemplateDict()
        env.globals["namespace"] = _TemplateNamespace
        try:
            self._template = env.from_string(source)
        except TemplateSyntaxError as exc:
            raise InvalidPackageError(f"chat template is not valid Jinja: {exc.message} (line {exc.lineno})") from None
        except TemplateError as exc:
            raise InvalidPackageError(f"chat template could not be compiled: {exc}") from None

    @property
    def source(self) -> str:
        """The template text."""
        return self._source

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render ``messages`` to the prompt text.

        ``extra`` is passed to the template as variables (e.g. ``tools=[...]``,
        ``enable_thinking=False``, ``date_string=...``); it overrides the defaults
        ``tools=None``, ``documents=None`` and the bos/eos tokens.

        Raises GenerationError for invalid messages or when the template rejects the
        conversation (``raise_exception``), and InvalidPackageError when the template
        tries unsafe access.
        """
        context: dict[str, Any] = {"tools": None, "documents": None}
        if self._bos_token is not None:
            context["bos_token"] = self._bos_token
        if self._eos_token is not None:
            context["eos_token"] = self._eos_token
        context.update(_plain(extra))
        context["messages"] = _validate_messages(messages)
        context["add_generation_prompt"] = bool(add_generation_prompt)
        try:
            return _bounded_render(self._template, context)
        except _RenderLimit as exc:
            raise InvalidPackageError(
                f"the chat template was stopped: {exc}; it is broken or hostile: fix the folder's chat template "
                "or pass a plain prompt (--raw)"
            ) from None
        except SecurityError as exc:
            raise InvalidPackageError(
                f"the chat template tried unsafe access and was stopped by the sandbox ({exc}); "
                "the model package's chat template is not trustworthy"
            ) from None
        except _TemplateRaised as exc:
            raise GenerationError(f"the chat template rejected this conversation: {exc.message}") from None
        except TemplateError as exc:
            raise GenerationError(f"the chat template failed to render: {exc}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError) as exc:
            raise GenerationError(f"the chat template failed to render: {type(exc).__name__}: {exc}") from None

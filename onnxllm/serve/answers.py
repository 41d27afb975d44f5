"""OpenAI responses from a ChunkStream: whole answers, and streams of server-sent events.

The route picks the shape; everything about turning onnxllm Chunks into OpenAI objects is here.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from .. import __version__
from ..runtime.generate import Chunk, Timings
from .registry import ChunkStream
from .schemas import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatDelta,
                      Completion, CompletionChoice, FunctionCall, FunctionCallDelta, PromptTokensDetails, ToolCall,
                      ToolCallDelta, Usage)
from .sse import DONE, event

FINGERPRINT = f"onnxllm-{__version__}"
# onnxllm's finish reasons -> OpenAI's: an EOS token is a natural stop; "cancelled" only reaches a client
# that left, so it never goes out.
FINISH = {"stop": "stop", "eos": "stop", "length": "length", "cancelled": "stop"}


@dataclass(frozen=True)
class Envelope:
    """What every object of one response shares."""

    model: str
    id: str
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def new(cls, model: str, prefix: str) -> "Envelope":
        return cls(model=model, id=f"{prefix}-{uuid.uuid4().hex[:24]}")


def usage(timings: Timings | None) -> Usage:
    t = timings or Timings()
    return Usage(prompt_tokens=t.prompt_tokens, completion_tokens=t.generated_tokens,
                 total_tokens=t.prompt_tokens + t.generated_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=t.cached_tokens))


def _finish(last: Chunk | None, called: bool) -> str:
    return "tool_calls" if called else FINISH[last.finish_reason] if last else "stop"


def _tool_call(call) -> ToolCall:
    return ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments_json))


async def collect(run: ChunkStream) -> tuple[str, Chunk | None, list]:
    """The whole text, the final chunk (finish_reason, timings) and the tool calls."""
    parts, last, calls = [], None, []
    async for chunk in run:
        parts.append(chunk.text)
        calls.extend(chunk.tool_calls)
        if chunk.finish_reason:
            last = chunk
    return "".join(parts), last, calls


async def chat_completion(run: ChunkStream, env: Envelope) -> ChatCompletion:
    text, last, calls = await collect(run)
    message = AssistantMessage(content=text or None if calls else text,
                               tool_calls=[_tool_call(c) for c in calls] or None)
    return ChatCompletion(id=env.id, created=env.created, model=env.model, system_fingerprint=FINGERPRINT,
                          choices=[ChatChoice(message=message, finish_reason=_finish(last, bool(calls)))],
                          usage=usage(last.timings if last else None))


async def chat_events(run: ChunkStream, env: Envelope, *, include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: ChatDelta, finish: str | None = None) -> str:
        return event(ChatCompletionChunk(id=env.id, created=env.created, model=env.model,
                                         system_fingerprint=FINGERPRINT,
                                         choices=[ChatChunkChoice(delta=delta, finish_reason=finish)]))

    yield chunk(ChatDelta(role="assistant", content=""))
    last, called = None, 0
    async for piece in run:
        if piece.text:
            yield chunk(ChatDelta(content=piece.text))
        if piece.tool_calls:  # a call is parsed whole, so it goes out as one delta with all its arguments
            deltas = [ToolCallDelta(index=called + i, id=c.id, type="function",
                                    function=FunctionCallDelta(name=c.name, arguments=c.arguments_json))
                      for i, c in enumerate(piece.tool_calls)]
            called += len(deltas)
            yield chunk(ChatDelta(tool_calls=deltas))
        if piece.finish_reason:
            last = piece
            yield chunk(ChatDelta(), _finish(piece, bool(called)))
    if include_usage:
        yield event(ChatCompletionChunk(id=env.id, created=env.created, model=env.model,
                                        system_fingerprint=FINGERPRINT, choices=[],
                                        usage=usage(last.timings if last else None)))
    yield DONE


async def completion(run: ChunkStream, env: Envelope, *, echo: str = "") -> Completion:
    text, last, _ = await collect(run)
    finish = FINISH[last.finish_reason] if last else "stop"
    return Completion(id=env.id, created=env.created, model=env.model, system_fingerprint=FINGERPRINT,
                      choices=[CompletionChoice(text=echo + text, finish_reason=finish)],
                      usage=usage(last.timings if last else None))


async def completion_events(run: ChunkStream, env: Envelope, *, include_usage: bool,
                            echo: str = "") -> AsyncIterator[str]:
    def chunk(text: str, finish: str | None = None) -> str:
        return event(Completion(id=env.id, created=env.created, model=env.model, system_fingerprint=FINGERPRINT,
                                choices=[CompletionChoice(text=text, finish_reason=finish)]))

    if echo:
        yield chunk(echo)
    last = None
    async for piece in run:
        if piece.text:
            yield chunk(piece.text)
        if piece.finish_reason:
            last = piece
            yield chunk("", FINISH[piece.finish_reason])
    if include_usage:
        yield event(Completion(id=env.id, created=env.created, model=env.model, system_fingerprint=FINGERPRINT,
                               choices=[], usage=usage(last.timings if last else None)))
    yield DONE

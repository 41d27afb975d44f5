"""OpenAI responses from a ChunkStream: whole answers, and streams of server-sent events.

The route picks the shape; everything about turning onnxllm Chunks into OpenAI objects is here.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from ..runtime.generate import Chunk, Logprob, Timings
from ..version import __version__
from .registry import ChunkStream
from .schemas import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatDelta,
                      ChoiceLogprobs, Completion, CompletionChoice, CompletionLogprobs, FunctionCall,
                      FunctionCallDelta, PromptTokensDetails, TokenLogprob, ToolCall, ToolCallDelta, TopLogprob, Usage)
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


def _bytes(text: str) -> list[int] | None:
    # A token that ends inside a UTF-8 character decodes to U+FFFD alone: its own bytes are not known here.
    return None if "\ufffd" in text else list(text.encode("utf-8"))


def chat_logprobs(items: list[Logprob]) -> ChoiceLogprobs | None:
    if not items:
        return None
    return ChoiceLogprobs(content=[
        TokenLogprob(token=lp.text, logprob=lp.logprob, bytes=_bytes(lp.text),
                     top_logprobs=[TopLogprob(token=text, logprob=value, bytes=_bytes(text))
                                   for _, text, value in lp.top])
        for lp in items])


def completion_logprobs(items: list[Logprob], offset: int = 0) -> CompletionLogprobs | None:
    if not items:
        return None
    offsets = []
    for lp in items:
        offsets.append(offset)
        offset += len(lp.text)
    return CompletionLogprobs(tokens=[lp.text for lp in items], token_logprobs=[lp.logprob for lp in items],
                              top_logprobs=[{text: value for _, text, value in lp.top} for lp in items],
                              text_offset=offsets)


async def collect(run: ChunkStream) -> tuple[str, Chunk | None, list, list[Logprob]]:
    """The whole text, the final chunk (finish_reason, timings), the tool calls and the log-probabilities."""
    parts, last, calls, logprobs = [], None, [], []
    async for chunk in run:
        parts.append(chunk.text)
        calls.extend(chunk.tool_calls)
        if chunk.logprobs is not None:
            logprobs.append(chunk.logprobs)
        if chunk.finish_reason:
            last = chunk
    return "".join(parts), last, calls, logprobs


async def chat_completion(run: ChunkStream, env: Envelope) -> ChatCompletion:
    text, last, calls, logprobs = await collect(run)
    message = AssistantMessage(content=text or None if calls else text,
                               tool_calls=[_tool_call(c) for c in calls] or None)
    choice = ChatChoice(message=message, logprobs=chat_logprobs(logprobs), finish_reason=_finish(last, bool(calls)))
    return ChatCompletion(id=env.id, created=env.created, model=env.model, system_fingerprint=FINGERPRINT,
                          choices=[choice], usage=usage(last.timings if last else None))


async def chat_events(run: ChunkStream, env: Envelope, *, include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: ChatDelta, finish: str | None = None, logprobs: ChoiceLogprobs | None = None) -> str:
        choice = ChatChunkChoice(delta=delta, logprobs=logprobs, finish_reason=finish)
        return event(ChatCompletionChunk(id=env.id, created=env.created, model=env.model,
                                         system_fingerprint=FINGERPRINT, choices=[choice]))

    yield chunk(ChatDelta(role="assistant", content=""))
    last, called = None, 0
    async for piece in run:
        if piece.text or piece.logprobs:  # a token held back (a possible stop string) still has its logprob
            scored = chat_logprobs([piece.logprobs] if piece.logprobs else [])
            yield chunk(ChatDelta(content=piece.text), logprobs=scored)
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
    text, last, _, logprobs = await collect(run)
    finish = FINISH[last.finish_reason] if last else "stop"
    choice = CompletionChoice(text=echo + text, logprobs=completion_logprobs(logprobs, len(echo)), finish_reason=finish)
    return Completion(id=env.id, created=env.created, model=env.model, system_fingerprint=FINGERPRINT,
                      choices=[choice], usage=usage(last.timings if last else None))


async def completion_events(run: ChunkStream, env: Envelope, *, include_usage: bool,
                            echo: str = "") -> AsyncIterator[str]:
    def chunk(text: str, finish: str | None = None, logprobs: CompletionLogprobs | None = None) -> str:
        return event(Completion(id=env.id, created=env.created, model=env.model, system_fingerprint=FINGERPRINT,
                                choices=[CompletionChoice(text=text, logprobs=logprobs, finish_reason=finish)]))

    if echo:
        yield chunk(echo)
    last, offset = None, len(echo)
    async for piece in run:
        if piece.text or piece.logprobs:
            yield chunk(piece.text, logprobs=completion_logprobs([piece.logprobs] if piece.logprobs else [], offset))
            offset += len(piece.logprobs.text) if piece.logprobs else 0
        if piece.finish_reason:
            last = piece
            yield chunk("", FINISH[piece.finish_reason])
    if include_usage:
        yield event(Completion(id=env.id, created=env.created, model=env.model, system_fingerprint=FINGERPRINT,
                               choices=[], usage=usage(last.timings if last else None)))
    yield DONE

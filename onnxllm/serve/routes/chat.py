"""POST /v1/chat/completions: messages through the model's chat template, streamed or whole."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..answers import Envelope, chat_completion, chat_events
from ..schemas import ChatCompletionRequest
from ..sse import EventStream, cancel_on_disconnect
from .common import refuse, registry

router = APIRouter()


def _check(body: ChatCompletionRequest) -> None:
    if body.top_logprobs is not None and not body.logprobs:
        raise refuse("top_logprobs", "top_logprobs needs logprobs: true")
    if body.tool_choice not in (None, "auto", "none") and not body.tools:
        raise refuse("tool_choice", "tool_choice forces a call to one of the tools, but no tools were given")
    if body.response_format and body.response_format.type == "json_schema" and body.response_format.json_schema is None:
        raise refuse("response_format", "response_format json_schema needs a json_schema: {name, schema}")


def _tools(body: ChatCompletionRequest) -> list[dict] | None:
    """The tool definitions for the template; tool_choice 'none' keeps them from the model altogether."""
    if not body.tools or body.tool_choice == "none":
        return None
    return [tool.model_dump(exclude_none=True) for tool in body.tools]


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    _check(body)
    messages, options, tools = body.template_messages(), body.generation_options(), _tools(body)
    run = registry(request).open(
        body.model, lambda model, cancel: model.stream(messages, cancel=cancel, tools=tools,
                                                       tool_choice=body.tool_choice_name, **options))
    env = Envelope.new(body.model, "chatcmpl")
    async with cancel_on_disconnect(request.receive, run.cancel):
        await run.ready()
        if not body.stream:
            return JSONResponse((await chat_completion(run, env)).model_dump(exclude_none=True))
    return EventStream(chat_events(run, env, include_usage=body.include_usage), run.cancel)

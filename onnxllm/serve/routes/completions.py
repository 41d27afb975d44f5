"""POST /v1/completions: raw text completion (no chat template), streamed or whole."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..answers import Envelope, completion, completion_events
from ..schemas import CompletionRequest
from ..sse import EventStream, cancel_on_disconnect
from .common import refuse, registry

router = APIRouter()


def _check(body: CompletionRequest) -> None:
    if isinstance(body.prompt, list) and len(body.prompt) != 1:
        raise refuse("prompt", f"give one prompt per request, got a list of {len(body.prompt)}")
    if body.suffix:
        raise refuse("suffix", "fill-in-the-middle is not supported")
    if body.logprobs is not None and body.echo:
        raise refuse("logprobs", "log-probabilities of an echoed prompt are not computed; drop echo or logprobs")


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request):
    _check(body)
    prompt, options = body.text, body.generation_options()
    run = registry(request).open(body.model, lambda model, cancel: model.stream(prompt, cancel=cancel, **options))
    env = Envelope.new(body.model, "cmpl")
    echo = prompt if body.echo else ""
    async with cancel_on_disconnect(request.receive, run.cancel):
        await run.ready()
        if not body.stream:
            return JSONResponse((await completion(run, env, echo=echo)).model_dump(exclude_none=True))
    return EventStream(completion_events(run, env, include_usage=body.include_usage, echo=echo), run.cancel)

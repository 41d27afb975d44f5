"""Server-sent events over a ChunkStream, and cancelling a generation when its client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import AsyncIterator

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .errors import error_body, to_api_error

DONE = "data: [DONE]\n\n"


def event(payload: BaseModel | dict) -> str:
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"
    import json

    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def guarded(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """An error after the response started cannot change the status: send it as an event (as OpenAI does)."""
    try:
        async for item in events:
            yield item
    except Exception as exc:  # noqa: BLE001 - reported to the client, logged by to_api_error when unexpected
        yield event(error_body(to_api_error(exc)))
        yield DONE


class EventStream(StreamingResponse):
    """text/event-stream whose generation is cancelled however the response ends: finished, client gone
    (Starlette stops the body iterator on http.disconnect), or the server shutting down."""

    def __init__(self, events: AsyncIterator[str], cancel: threading.Event):
        super().__init__(guarded(events), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.cancel = cancel

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.cancel.set()


@contextlib.asynccontextmanager
async def cancel_on_disconnect(receive: Receive, cancel: threading.Event):
    """While a request waits for its first token (or a whole non-streamed answer), watch for the client leaving."""

    async def watch() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                cancel.set()
                return

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

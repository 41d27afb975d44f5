"""The ASGI app: routes, the one error mapping, API-key check, body limit, optional CORS, the unload timer."""

from __future__ import annotations

import asyncio
import contextlib
import hmac

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..version import __version__
from ..errors import OnnxLLMError
from .config import ServeOptions
from .errors import APIError, error_body, error_response
from .registry import Registry
from .routes import routers


class Guard:
    """Pure ASGI middleware (it must not buffer streamed responses): the API key on /v1/*, and the body limit.

    The body is read here, up to the limit, and replayed to the app; after it, receive() goes straight
    to the server again, so the routes still see the client's disconnect."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"].startswith("/v1/") and scope["method"] != "OPTIONS":
            given = headers.get(b"authorization", b"")
            scheme, _, key = given.partition(b" ")
            if not given or scheme.lower() != b"bearer":
                error = APIError(401, "missing API key: send the header 'Authorization: Bearer KEY' (the openai "
                                      "client's api_key)", code="invalid_api_key")
                await self._reply(error, scope, receive, send)
                return
            if not hmac.compare_digest(key.strip(), self.api_key):
                await self._reply(APIError(401, "incorrect API key", code="invalid_api_key"), scope, receive, send)
                return
        too_large = APIError(413, f"the request body is larger than {self.max_body} bytes", code="body_too_large")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await self._reply(too_large, scope, receive, send)
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        buffered: list[Message] = []
        size = 0
        while True:  # chunked bodies carry no Content-Length: count as they come
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_body:
                await self._reply(too_large, scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _reply(error: APIError, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
        await JSONResponse(error_body(error), status_code=error.status, headers=headers)(scope, receive, send)


def create_app(registry: Registry, options: ServeOptions) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        reaper = asyncio.create_task(registry.reaper())
        try:
            yield
        finally:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
            registry.close()

    # No /docs or /redoc: their pages load scripts from a CDN. /openapi.json stays (a local file).
    app = FastAPI(title="onnxllm", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.registry = registry
    for router in routers():
        app.include_router(router)

    async def handle(request, exc):
        return error_response(exc)

    for kind in (RequestValidationError, HTTPException, APIError, OnnxLLMError, Exception):
        app.add_exception_handler(kind, handle)
    app.add_middleware(Guard, api_key=options.api_key, max_body_bytes=options.max_body_bytes)
    if options.cors_origins:  # added last = outermost, so preflight requests never meet the key check
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return app

"""A real uvicorn server on a free loopback port, in a thread of the test process, for the server's tests.

    with LiveServer(ServeOptions(models=(str(pkg),))) as server:
        client = server.openai()              # the official openai client, pointed at it
        server.registry                       # the app's Registry, to look at queues and counters
"""

from __future__ import annotations

import asyncio
import threading
import time

import uvicorn

from onnxllm.serve import ServeOptions, build_app


class LiveServer:
    def __init__(self, options: ServeOptions, *, app=None):
        self.options = options
        self.app = build_app(options) if app is None else app
        self.registry = self.app.state.registry
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=asyncio.run, args=(self._serve(),), name="test-uvicorn", daemon=True)

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.server.serve()

    def call(self, fn, *args):
        """Run fn(*args) on the server's event loop (where the registry must be used) and return its result."""

        async def wrapped():
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout=30)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def openai(self, api_key: str = "none", **options):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **options)

    def wait_idle(self, name: str, timeout: float = 60.0) -> dict:
        """The model's /health entry once nothing runs or waits on it (generous bound: the machine is shared)."""
        deadline = time.monotonic() + timeout
        while True:
            entry = next(m for m in self.registry.status() if m["id"] == name)
            if entry["running"] == 0 and entry["queued"] == 0:
                return entry
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} still busy after {timeout}s: {entry}")
            time.sleep(0.02)

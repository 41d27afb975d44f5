"""The models a server was started with: loaded on first use, unloaded after keep-alive idle, one queue each.

Each model has one worker thread, so its requests take turns in arrival order (a Model serializes its
own use anyway; the thread keeps the event loop free and makes the queue explicit and bounded). A
request can only name a model configured at start: no path from a request reaches the filesystem.
Generation runs on the worker thread and reaches the event loop as a ChunkStream.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..runtime.generate import Chunk
from ..runtime.model import Model
from .errors import APIError

# Builds one request's stream on the worker thread: start(model, cancel) -> chunks.
Start = Callable[[Model, threading.Event], Iterator[Chunk]]
Loader = Callable[[Path], Model]

_END = object()


@dataclass
class Counters:
    served: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0


@dataclass
class Slot:
    name: str
    path: Path
    created: int
    executor: ThreadPoolExecutor
    model: Model | None = None
    pending: int = 0  # admitted and not finished: the one running plus those waiting
    last_used: float = field(default_factory=time.monotonic)
    durations: deque = field(default_factory=lambda: deque(maxlen=16))  # seconds of recent requests
    counters: Counters = field(default_factory=Counters)
    last_finish: Chunk | None = None  # the last request's final chunk (finish_reason, timings)


class ChunkStream:
    """One request's chunks: produced on a model's worker thread, consumed on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, model: str):
        self.model = model
        self.cancel = threading.Event()
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._head: list = []

    def put(self, item) -> None:  # worker thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop closed under us (server shutting down): nobody is listening
            self.cancel.set()

    async def _next(self):
        item = self._head.pop() if self._head else await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def ready(self) -> None:
        """Wait for the first chunk, so that errors (bad options, context overflow) raise before a response starts."""
        try:
            self._head.append(await self._next())
        except BaseException:
            self.cancel.set()  # an error, or the request itself cancelled: generate for nobody
            raise

    def __aiter__(self):
        return self

    async def __anext__(self) -> Chunk:
        item = await self._next()
        if item is _END:
            raise StopAsyncIteration
        return item


class Registry:
    def __init__(self, models: dict[str, Path], loader: Loader, *, max_queue: int, keep_alive_s: float | None):
        now = int(time.time())
        self._slots = {name: Slot(name, path, now, ThreadPoolExecutor(1, thread_name_prefix=f"onnxllm-{name}"))
                       for name, path in models.items()}
        self._loader = loader
        self.max_queue = max_queue
        self.keep_alive_s = keep_alive_s

    def names(self) -> list[str]:
        return list(self._slots)

    def slot(self, name: str) -> Slot:
        try:
            return self._slots[name]
        except KeyError:
            raise APIError(404, f"model {name!r} is not served here; this server serves: {', '.join(self._slots)} "
                                "(GET /v1/models)", param="model", code="model_not_found") from None

    def status(self) -> list[dict]:
        return [{"id": s.name, "loaded": s.model is not None, "running": min(s.pending, 1),
                 "queued": max(s.pending - 1, 0), **vars(s.counters)} for s in self._slots.values()]

    def open(self, name: str, start: Start) -> ChunkStream:
        """Queue `start` on the model's worker (503 when its queue is full); the caller awaits `ready()`.
        Call it on the event loop."""
        slot = self.slot(name)
        if slot.pending > self.max_queue:
            slot.counters.rejected += 1
            raise APIError(503, f"model {name!r} has {slot.pending - 1} requests waiting (--max-queue "
                                f"{self.max_queue}); retry later", type="server_error", code="queue_full",
                           headers={"Retry-After": str(self._retry_after(slot))})
        loop = asyncio.get_running_loop()
        run = ChunkStream(loop, name)
        slot.pending += 1
        future = loop.run_in_executor(slot.executor, self._work, slot, start, run)
        future.add_done_callback(lambda _: self._finished(slot))
        return run

    def _retry_after(self, slot: Slot) -> int:
        mean = sum(slot.durations) / len(slot.durations) if slot.durations else 1.0
        return max(1, min(60, math.ceil(mean * slot.pending)))

    def _finished(self, slot: Slot) -> None:  # event loop thread
        slot.pending -= 1
        slot.last_used = time.monotonic()

    def _work(self, slot: Slot, start: Start, run: ChunkStream) -> None:  # worker thread
        if run.cancel.is_set():  # the client left while waiting in the queue
            slot.counters.cancelled += 1
            run.put(_END)
            return
        began = time.monotonic()
        last = None
        try:
            if slot.model is None:
                slot.model = self._loader(slot.path)
            for chunk in start(slot.model, run.cancel):
                run.put(chunk)
                last = chunk
            run.put(_END)
        except Exception as exc:  # noqa: BLE001 - handed to the request, which maps it to an HTTP error
            slot.counters.failed += 1
            run.put(exc)
            return
        finally:
            slot.durations.append(time.monotonic() - began)
        last = last if isinstance(last, Chunk) else None  # an embedding request's one item is its vectors
        slot.last_finish = last
        if last is not None and last.finish_reason == "cancelled":
            slot.counters.cancelled += 1
        else:
            slot.counters.served += 1

    def reap(self, now: float | None = None) -> list[str]:
        """Unload models idle for longer than keep-alive; returns their names. Runs on the event loop thread,
        where `pending` changes, so a model with no request admitted is never in use."""
        if self.keep_alive_s is None:
            return []
        now = time.monotonic() if now is None else now
        unloaded = []
        for slot in self._slots.values():
            if slot.model is not None and slot.pending == 0 and now - slot.last_used >= self.keep_alive_s:
                slot.model = None  # the session's memory goes with the last reference
                unloaded.append(slot.name)
        return unloaded

    async def reaper(self) -> None:
        """Background task: check for idle models a few times per keep-alive period."""
        if self.keep_alive_s is None:
            return
        period = min(max(self.keep_alive_s / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(period)
            self.reap()

    def close(self) -> None:
        for slot in self._slots.values():
            slot.executor.shutdown(wait=False, cancel_futures=True)
            slot.model = None

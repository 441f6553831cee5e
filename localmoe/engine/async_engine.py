"""Runs the engine loop in its own thread so HTTP handling never waits on a forward pass.

The engine is also built on that thread. The OpenMP threads that run PyTorch's CPU kernels form a team
per thread that starts parallel work; had the main thread loaded the model (copying weights runs in
parallel), its idle team would slow every step of the engine thread's team by 1.3-1.8x (measured on
2 cores: a 12 ms decode step took 17-22 ms). Kept on one thread, the loop runs as fast as offline.

The event loop hands requests and aborts to the engine thread through an inbox; each step's
outputs go back to the waiting coroutine through its asyncio queue. A coroutine that goes away
(client disconnected, task cancelled) aborts its request, which frees its KV blocks at the top of
the engine's next loop iteration.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

from localmoe.engine.llm_engine import LLMEngine, RequestError
from localmoe.outputs import RequestOutput
from localmoe.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, build: Callable[[], LLMEngine]) -> None:
        """Build the engine with `build` on the engine thread; raises whatever `build` raises."""
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._go = threading.Event()  # start() or shutdown() was called
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._built: LLMEngine | BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(build,), name="localmoe-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if isinstance(self._built, BaseException):
            raise self._built
        self.engine: LLMEngine = self._built

    def start(self) -> None:
        self._go.set()

    def shutdown(self) -> None:
        self._stopped = True
        self._go.set()
        self._wakeup.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _main(self, build: Callable[[], LLMEngine]) -> None:
        try:
            self._built = build()
        except BaseException as error:  # noqa: BLE001 -- re-raised on the constructing thread
            self._built = error
            return
        finally:
            self._ready.set()
        self._go.wait()
        self._run()

    async def generate(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None,
                       params: SamplingParams, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative output after every step it takes part in."""
        if request_id in self._streams:
            raise RequestError(f"request id {request_id!r} is already in use", "request_id")
        request = self.engine.make_request(request_id, prompt, prompt_token_ids, params, priority)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._send(("add", request))
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def queue_full(self, incoming: int = 1) -> bool:
        """Would `incoming` more requests push the waiting queue past max_waiting_requests?"""
        waiting = len(self._streams) - self.engine.stats.num_running
        return waiting + incoming > self.engine.config.max_waiting_requests

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def _send(self, message: tuple) -> None:
        self._inbox.put(message)
        self._wakeup.set()

    def _run(self) -> None:
        while not self._stopped:
            self._drain_inbox()
            if not self.engine.has_unfinished_requests():
                self._wakeup.wait(timeout=1.0)
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as error:  # a failed step fails its requests, not the server
                log.exception("engine step failed")
                self._fail_all(error)
                continue
            self._deliver_all([(output.request_id, output) for output in outputs])

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                if payload.request_id in self._streams:
                    self.engine.add(payload)
            else:
                self.engine.abort_request(payload)

    def _fail_all(self, error: Exception) -> None:
        failed = list(self.engine.requests)
        for request_id in failed:
            self.engine.abort_request(request_id)
        self._deliver_all([(request_id, RuntimeError(f"engine step failed: {error}")) for request_id in failed])

    def _deliver_all(self, items: list[tuple[str, object]]) -> None:
        """Hand a step's outputs to their streams with one wakeup per event loop, not one per stream: each wakeup
        makes the loop's thread take the GIL from the engine thread (py-spy at one stream: ~9% of the engine
        thread's samples were in that wakeup; one per stream would pay it for every stream each step)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for request_id, item in items:
            target = self._streams.get(request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, deliveries in by_loop.items():
            loop.call_soon_threadsafe(_put_all, deliveries)


def _put_all(deliveries: list[tuple[asyncio.Queue, object]]) -> None:
    for stream, item in deliveries:
        stream.put_nowait(item)

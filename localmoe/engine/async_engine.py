"""Runs the engine loop in its own thread so HTTP handling never waits on a forward pass.

The engine is also built on that thread. The OpenMP threads that run PyTorch's CPU kernels form a team
per thread that starts parallel work; had the main thread loaded the model (copying weights runs in
parallel), its idle team would slow every step of the engine thread's team by 1.3-1.8x (measured on
2 cores: a 12 ms decode step took 17-22 ms). Kept on one thread, the loop runs as fast as offline.

The event loop hands requests and aborts to the engine thread through an inbox; each step's
outputs go back to the waiting coroutine through its asyncio queue. A coroutine that goes away
(client disconnected, task cancelled) aborts its request, which frees its KV blocks at the top of
the engine's next loop iteration.

Admission is counted here, on the event loop, in sequences (prompts x n): a request takes its place
synchronously, before its first await, so a burst cannot overshoot the bound. The loop's heartbeat
and the thread's fate are what /health reports: a dead engine thread, a dead tensor-parallel worker, or a loop that
makes no progress while work waits is unhealthy, and its waiting requests are failed rather than left hanging.

With expert parallelism over data-parallel ranks (distributed/dp_expert_parallel.py) the loop steps even without
a request of its own while another rank has one (its steps need this rank's), and when no rank has one it asks
again every LOCKSTEP_POLL_S instead of sleeping until a request arrives; shut down, it steps on until no rank has
a request, so that a drain on every rank lets the others' requests finish.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable

from localmoe.engine.llm_engine import LLMEngine, RequestError
from localmoe.engine.sequence import Request
from localmoe.engine.stats import LoopStats
from localmoe.outputs import RequestOutput
from localmoe.sampling_params import SamplingParams

log = logging.getLogger(__name__)


# Test-only fault injection, read once: "engine-exit" ends the engine thread at its next step as a crash would,
# "engine-stall" blocks that step for good. Never set in production; the tests of /health use it.
FAULT = os.environ.get("LOCALMOE_FAULT_INJECTION", "")
# how often idle data-parallel ranks with expert parallelism agree whether one has work: a request's wait at most
LOCKSTEP_POLL_S = 0.02


class EngineDeadError(RuntimeError):
    """The engine thread has stopped: nothing more will be served by this process."""


class RequestFailedError(RuntimeError):
    """The engine failed this request alone (an error while computing its tokens)."""


class AsyncEngine:
    def __init__(self, build: Callable[[], LLMEngine], stall_timeout: float = 120.0) -> None:
        """Build the engine with `build` on the engine thread; raises whatever `build` raises."""
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._go = threading.Event()  # start() or shutdown() was called
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._built: LLMEngine | BaseException | None = None
        self._ready = threading.Event()
        self._heartbeat = time.monotonic()  # the engine loop's last sign of progress
        self.stall_timeout = stall_timeout
        self.fatal: BaseException | None = None  # what ended the engine thread, if anything did
        self._thread = threading.Thread(target=self._main, args=(build,), name="localmoe-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if isinstance(self._built, BaseException):
            raise self._built
        self.engine: LLMEngine = self._built
        config = self.engine.config
        # the engine thread's own statistics and vLLM's log line
        self.loop_stats = LoopStats(self.engine, log_lines=not config.disable_log_stats)
        self.capacity = config.max_num_seqs + config.max_waiting_requests  # sequences held at once
        self.num_reserved = 0  # sequences admitted and not yet done (event loop only)

    def start(self) -> None:
        self._go.set()

    def shutdown(self) -> None:
        self._stopped = True
        self._go.set()
        self._wakeup.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        # expert parallelism over data-parallel ranks: the others' requests still need this rank's steps
        while self._thread.is_alive() and isinstance(self._built, LLMEngine) and self._built.in_lockstep():
            self._thread.join(timeout=1)
        if isinstance(self._built, LLMEngine):
            self._built.runner.shutdown()

    # ---- admission and health (event loop) ------------------------------------------------------

    def try_reserve(self, num_seqs: int) -> bool:
        """Take places for `num_seqs` sequences if the bound allows; pair with release()."""
        if self.num_reserved + num_seqs > self.capacity:
            return False
        self.num_reserved += num_seqs
        return True

    def release(self, num_seqs: int) -> None:
        self.num_reserved -= num_seqs

    def health_problem(self) -> str | None:
        """Why the engine cannot serve, or None when it can."""
        if self.fatal is not None or not self._thread.is_alive():
            return "the engine thread has stopped"
        if (problem := self.engine.runner.health_problem()) is not None:
            return problem
        idle_for = time.monotonic() - self._heartbeat
        if (self._streams or not self._inbox.empty()) and idle_for > self.stall_timeout:
            return f"the engine has made no progress for {idle_for:.0f} s with requests waiting"
        return None

    def fail_streams(self, error: BaseException) -> None:
        """End every stream now with `error` (shutdown past its deadline); their requests are then aborted."""
        for _, stream in list(self._streams.values()):
            stream.put_nowait(error)

    # ---- requests (event loop) -------------------------------------------------------------------

    async def generate(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None,
                       params: SamplingParams, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative output after every step it takes part in."""
        request = self.engine.make_request(request_id, prompt, prompt_token_ids, params, priority)
        async for output in self.stream(request):
            yield output

    async def stream(self, request: Request) -> AsyncIterator[RequestOutput]:
        """generate() for a request already made (and so validated) by the engine's make_request."""
        request_id = request.request_id
        if request_id in self._streams:
            raise RequestError(f"request id {request_id!r} is already in use", "request_id")
        if self.fatal is not None or not self._thread.is_alive():
            raise EngineDeadError("the engine thread has stopped; this server cannot serve requests")
        if (problem := self.engine.runner.health_problem()) is not None:
            raise EngineDeadError(f"{problem}; this server cannot serve requests")
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

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def _send(self, message: tuple) -> None:
        self._inbox.put(message)
        self._wakeup.set()

    # ---- the engine thread -----------------------------------------------------------------------

    def _main(self, build: Callable[[], LLMEngine]) -> None:
        try:
            self._built = build()
        except BaseException as error:  # noqa: BLE001 -- re-raised on the constructing thread
            self._built = error
            return
        finally:
            self._ready.set()
        self._go.wait()
        try:
            self._run()
        except BaseException as error:  # noqa: BLE001 -- recorded for /health; every waiting stream is told
            self.fatal = error
            log.critical("the engine thread stopped: %r", error, exc_info=error)
            dead = EngineDeadError(f"the engine thread stopped: {error!r}")
            self._deliver_all([(request_id, dead) for request_id in list(self._streams)])

    def _run(self) -> None:
        idle = False
        lockstep = self.engine.runner.expert_group is not None
        while not self._stopped or (lockstep and self.engine.in_lockstep()):
            self._heartbeat = time.monotonic()
            self.loop_stats.tick()
            self._drain_inbox()
            if not self.engine.has_unfinished_requests():
                if not idle:  # the statistics of the engine at rest (after aborts, too), the loop's with them
                    self.engine.publish_stats()
                    self.loop_stats.publish(time.monotonic())
                    idle = True
                if lockstep and self.engine.runner.expert_group.failure is None:
                    # expert parallelism over data-parallel ranks: step with the others, which may have work; when
                    # none has, wait a moment (a rank that gets a request waits for the others to come round)
                    try:
                        self.engine.step()  # no request of its own: at most a dummy step, nothing to deliver
                    except Exception:  # noqa: BLE001 -- the ranks' group has failed: /health says so
                        log.exception("a data-parallel step with no request of this rank's failed")
                    if self.engine.in_lockstep():
                        continue
                self._wakeup.wait(timeout=LOCKSTEP_POLL_S if lockstep else 1.0)
                self._wakeup.clear()
                continue
            idle = False
            self._step()

    def _step(self) -> None:
        """One engine step, its outputs (and failures) to their streams."""
        _inject_fault()
        started = time.monotonic()
        try:
            outputs = self.engine.step()
        except Exception as error:  # noqa: BLE001 -- outside any one request: every request fails, the pool heals
            log.exception("engine step failed; aborting every request")
            failed = self.engine.recover()
            self._deliver_all([(request_id, RuntimeError(f"engine step failed: {error}"))
                               for request_id in failed])
            return
        self.loop_stats.after_step(outputs, started)
        items: list[tuple[str, object]] = [(output.request_id, output) for output in outputs]
        items += [(request_id, RequestFailedError(f"the request failed: {error!r}"))
                  for request_id, error in self.engine.take_failures().items()]
        self._deliver_all(items)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                if kind == "add":
                    if payload.request_id in self._streams:
                        self.engine.add(payload)
                else:
                    self.engine.abort_request(payload)
            except Exception as error:  # noqa: BLE001 -- this request fails, the loop goes on
                request_id = payload.request_id if kind == "add" else payload
                log.exception("could not %s request %s", kind, request_id)
                self.engine.abort_request(request_id)
                self._deliver_all([(request_id, RequestFailedError(f"the request failed: {error!r}"))])

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


def _inject_fault() -> None:
    if FAULT == "engine-exit":
        raise SystemExit("fault injection: engine-exit")
    if FAULT == "engine-stall":
        threading.Event().wait()

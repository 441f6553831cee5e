"""The engine requests behind one HTTP request (one per prompt), merged into one stream.

Whatever ends the HTTP request early (client gone, an error in a sibling prompt, server shutdown)
aborts every engine request still running, so their KV blocks are freed at once.

A Generation takes its places in the engine's bound when it is made, synchronously, one per
sequence (prompts x n), and gives each prompt's places back when that prompt ends for any reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TypeVar

from fastapi import Request

from localmoe.engine.async_engine import AsyncEngine, EngineDeadError
from localmoe.engine.llm_engine import RequestError
from localmoe.lora.request import LoRARequest
from localmoe.outputs import RequestOutput
from localmoe.sampling_params import SamplingParams
from localmoe.server.errors import APIError
from localmoe.server.metrics import ModelMetrics
from localmoe.server.rate_limits import KeyUse
from localmoe.server.tracing import CURRENT_TRACE

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass
class Prompt:
    text: str | None  # None for a prompt given as token ids
    token_ids: list[int]


class Generation:
    def __init__(self, aengine: AsyncEngine, metrics: ModelMetrics, base_id: str,
                 prompts: list[Prompt], params: list[SamplingParams], priority: int | None = None,
                 busy_status: HTTPStatus = HTTPStatus.SERVICE_UNAVAILABLE, key_use: KeyUse | None = None,
                 lora: LoRARequest | None = None) -> None:
        """`priority`: what the request asks (None: nothing); `busy_status`: the answer when the waiting queue is
        full (TGI's routes answer 429); `key_use`: the API key it came with, which sets its priority's default and
        bound, and counts its tokens; `lora`: the LoRA adapter its prompts run with (its name is the model the
        response names)."""
        self.request_ids = [f"{base_id}-{i}" for i in range(len(prompts))]
        self.model_name = aengine.engine.model_name if lora is None else lora.lora_name
        priority = key_use.priority(priority) if key_use is not None else priority or 0
        try:  # every field checked against the model before the request takes a place, let alone a stream
            self.requests = [aengine.engine.make_request(request_id, prompt.text, prompt.token_ids, p, priority,
                                                         lora)
                             for request_id, prompt, p in zip(self.request_ids, prompts, params)]
        except RequestError as e:
            raise APIError(str(e), param=e.param) from e
        num_seqs = sum(p.n for p in params)
        if num_seqs > aengine.capacity:
            raise APIError(f"this request asks for {num_seqs} sequences (prompts x n), more than the server ever "
                           f"holds at once ({aengine.capacity}: max_num_seqs + max_waiting_requests)", param="n")
        if not aengine.try_reserve(num_seqs):
            metrics.requests_rejected.labels(*metrics.labels, str(busy_status.value)).inc()
            raise APIError("The server is overloaded: its waiting queue is full. Retry shortly.", busy_status,
                           headers={"Retry-After": "1"})
        self.aengine = aengine
        self.metrics = metrics
        self.prompts = prompts
        self.base_id = base_id
        self.unfinished = set(self.request_ids)
        self.key_use = key_use
        self._reserved = {request_id: p.n for request_id, p in zip(self.request_ids, params)}
        self.params = params
        self.trace = CURRENT_TRACE.get()  # the HTTP request's (server/tracing.py), where tracing is on
        log.debug("%s: %d prompt(s) for %s version %s, max_tokens %s", base_id, len(prompts), *metrics.labels,
                  params[0].max_tokens)

    async def stream(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yield (prompt index, cumulative output) as any of the prompts progresses."""
        queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(i, queue)) for i in range(len(self.prompts))]
        remaining = len(tasks)
        try:
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
            self.abort_unfinished()

    async def final_outputs(self) -> list[RequestOutput]:
        """The last output of every prompt, in prompt order."""
        last: dict[int, RequestOutput] = {}
        async for i, output in self.stream():
            last[i] = output
        return [last[i] for i in range(len(self.prompts))]

    def abort_unfinished(self) -> None:
        """Abort what is still running and give back every place; safe to call more than once, from any cleanup
        path."""
        for request_id in sorted(self.unfinished):
            self.aengine.abort(request_id)
        self.unfinished.clear()
        for request_id in list(self._reserved):
            self._release(request_id)

    def _release(self, request_id: str) -> None:
        self.aengine.release(self._reserved.pop(request_id, 0))

    def _finished(self, i: int, output: RequestOutput) -> None:
        reasons = ",".join(str(c.finish_reason) for c in output.outputs)
        log.debug("%s finished (%s): %d prompt, %d generated tokens", output.request_id, reasons,
                  len(output.prompt_token_ids), sum(len(c.token_ids) for c in output.outputs))
        if self.trace is not None:
            self.trace.record(output, self.params[i], self.metrics.labels)

    async def _pump(self, i: int, queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]]) -> None:
        request_id = self.request_ids[i]
        last: RequestOutput | None = None  # its tokens not yet counted against its key
        try:
            async for output in self.aengine.stream(self.requests[i]):
                last = output
                if output.finished:
                    self.unfinished.discard(request_id)
                    self.metrics.observe_finished(output)
                    self._finished(i, output)
                    if self.key_use is not None:  # counted before the client sees the end, for its next request
                        last = None
                        await self.key_use.count(output)
                queue.put_nowait((i, output))
        except RequestError as e:
            queue.put_nowait((i, APIError(str(e), param=e.param)))
        except EngineDeadError as e:
            queue.put_nowait((i, APIError(str(e), HTTPStatus.SERVICE_UNAVAILABLE)))
        except Exception as e:  # noqa: BLE001 -- handed to the consumer, which raises it
            queue.put_nowait((i, e))
        else:
            queue.put_nowait((i, None))
        finally:
            self._release(request_id)
            if self.key_use is not None and last is not None:  # aborted: what it used so far
                self.key_use.count_later(last)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work`, cancelling it if the client hangs up first (then return None)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    return task.result() if task in done else None


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read already, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass

"""Graceful shutdown: on SIGTERM (or Ctrl-C) the server stops admitting requests, lets those in flight finish
within --shutdown-timeout seconds, ends whatever is still running with an error, and exits.

While draining, every new request and /health answer 503, so a load balancer stops sending traffic; a second
signal exits at once, as uvicorn does.
"""

from __future__ import annotations

import logging
import time
from http import HTTPStatus
from collections.abc import Callable
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from localmoe.engine.async_engine import AsyncEngine
from localmoe.server.errors import APIError

log = logging.getLogger(__name__)

GRACE_AFTER_FAILING = 5.0  # seconds for failed streams to send their error event and [DONE]


class Drain:
    def __init__(self, engines: Callable[[], list[AsyncEngine]], timeout: float) -> None:
        """`engines`: those of every model served, as they are when asked."""
        self.engines = engines
        self.timeout = timeout
        self.started_at: float | None = None
        self.failed_at: float | None = None
        self.announced = False

    @property
    def active(self) -> bool:
        return self.started_at is not None

    def begin(self) -> None:
        """Called from a signal handler: only records the moment."""
        if self.started_at is None:
            self.started_at = time.monotonic()

    def done(self) -> bool:
        """Whether the server may exit now; past the deadline, ends the requests still in flight (event loop)."""
        if not self.announced:
            self.announced = True
            log.info("draining: %d sequences in flight, %.0f s to finish", self.in_flight(), self.timeout)
        if self.in_flight() == 0:
            return True
        now = time.monotonic()
        if self.failed_at is None and now - self.started_at >= self.timeout:
            log.warning("shutdown timeout (%.0f s) passed: ending the requests still in flight", self.timeout)
            self.failed_at = now
            for aengine in self.engines():
                aengine.fail_streams(APIError("The server is shutting down; this request did not finish in time.",
                                              HTTPStatus.SERVICE_UNAVAILABLE))
        return self.failed_at is not None and now - self.failed_at >= GRACE_AFTER_FAILING

    def in_flight(self) -> int:
        return sum(aengine.num_reserved for aengine in self.engines())


class DrainMiddleware:
    """503 with Retry-After for every request that arrives while draining."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.drain.active:
            error = APIError("The server is shutting down.", HTTPStatus.SERVICE_UNAVAILABLE,
                             headers={"Retry-After": "5"})
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


class DrainingServer(uvicorn.Server):
    """uvicorn, with the first exit signal starting a drain instead of an immediate shutdown."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.active:  # a second signal: shut down now
            super().handle_exit(sig, frame)
        else:
            self.drain.begin()

    async def on_tick(self, counter: int) -> bool:
        if self.drain.active and not self.should_exit and self.drain.done():
            log.info("drained: shutting down")
            self.should_exit = True
        return await super().on_tick(counter)

"""Per-key limits on the generation routes, answered with 429 and Retry-After as OpenAI answers them, and per-key
usage in /metrics and /v1/stats/usage.

A request is admitted while its key has fewer than `requests_per_minute` requests in the last minute, fewer than
`max_concurrent_requests` in flight, and has used fewer than `tokens_per_minute` tokens in the last minute. Tokens
are counted as used (prompt and completion, as `usage` reports them) when each prompt of a request ends, finished
or aborted; a request is never cut short by the token limit, so the one that crosses it finishes and the next waits
until enough of the minute's tokens have aged out, which is what Retry-After says.

/metrics counts what this process served (Prometheus sums over replicas); /v1/stats/usage shows the totals of
every replica where the counters are shared (--redis-url).
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Coroutine
from dataclasses import asdict
from http import HTTPStatus
from typing import Any, Protocol

from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry, Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from localmoe.outputs import RequestOutput
from localmoe.server.errors import APIError
from localmoe.server.tenants import APIKey
from localmoe.server.usage_counters import CountersUnavailable, LocalCounters, Refusal, usage_summary

log = logging.getLogger(__name__)

# what makes tokens: OpenAI's completions and chat completions, TGI's generate routes (POST only)
TGI_PATHS = frozenset({"/generate", "/generate_stream", "/"})
LIMITED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"}) | TGI_PATHS
USAGE_PATH = "/v1/stats/usage"
LIMIT_WORDS = {"requests_per_minute": "requests per minute", "tokens_per_minute": "tokens per minute",
               "max_concurrent_requests": "concurrent requests"}


class Counters(Protocol):
    shared: bool

    async def admit(self, key: APIKey, ticket: str) -> Refusal | None: ...
    async def release(self, key: APIKey, ticket: str) -> None: ...
    async def add_tokens(self, key: APIKey, prompt: int, completion: int) -> None: ...
    async def totals(self) -> dict[str, dict[str, int]]: ...
    async def close(self) -> None: ...


class KeyMetrics:
    """Per-key series on the server's registry, labelled by the key's name; every key's start at 0, so rate()
    and alerts see the first request."""

    def __init__(self, registry: CollectorRegistry, keys: list[APIKey]) -> None:
        labels = ["key_name"]
        self.requests = Counter("localmoe:api_key_requests", "Requests admitted on the generation routes, by API "
                                "key.", labels, registry=registry)
        self.prompt_tokens = Counter("localmoe:api_key_prompt_tokens", "Prompt tokens used, by API key.", labels,
                                     registry=registry)
        self.generation_tokens = Counter("localmoe:api_key_generation_tokens", "Generated (completion) tokens, by "
                                         "API key.", labels, registry=registry)
        self.rejected = Counter("localmoe:api_key_requests_rejected", "Requests answered 429 because a limit of "
                                "their API key was reached, by the limit.", labels + ["limit"], registry=registry)
        for key in keys:
            for counter in (self.requests, self.prompt_tokens, self.generation_tokens):
                counter.labels(key.name)
            for limit, value in asdict(key.limits).items():
                if value is not None:
                    self.rejected.labels(key.name, limit)


class RateLimiter:
    """The keys' counters (this process's or Redis's) and metrics. Should the shared counters be unreachable,
    requests go on without limits (logged): Redis being down takes no replica down with it."""

    def __init__(self, counters: Counters, metrics: KeyMetrics, keys: list[APIKey]) -> None:
        self.counters = counters
        self.metrics = metrics
        self.keys = keys
        self._background: set[asyncio.Task] = set()

    async def admit(self, key: APIKey, ticket: str) -> Refusal | None:
        try:
            refused = await self.counters.admit(key, ticket)
        except CountersUnavailable as e:
            log.warning("admitting a request of %s without its limits: the usage counters are unreachable: %s",
                        key.name, e)
            refused = None
        if refused is None:
            self.metrics.requests.labels(key.name).inc()
        else:
            self.metrics.rejected.labels(key.name, refused.limit).inc()
        return refused

    async def release(self, key: APIKey, ticket: str) -> None:
        await self._unless_unreachable(self.counters.release(key, ticket))

    async def count(self, key: APIKey, output: RequestOutput) -> None:
        prompt, completion = len(output.prompt_token_ids), sum(len(c.token_ids) for c in output.outputs)
        self.metrics.prompt_tokens.labels(key.name).inc(prompt)
        self.metrics.generation_tokens.labels(key.name).inc(completion)
        await self._unless_unreachable(self.counters.add_tokens(key, prompt, completion))

    def count_later(self, key: APIKey, output: RequestOutput) -> None:
        """`count` from a cleanup path that must not wait (a task being cancelled)."""
        task = asyncio.get_running_loop().create_task(self.count(key, output))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def usage(self) -> dict[str, Any]:
        try:
            totals = await self.counters.totals()
        except CountersUnavailable as e:
            raise APIError(f"the usage counters are unreachable: {e}", HTTPStatus.SERVICE_UNAVAILABLE) from None
        keys = {key.name: key for key in self.keys}
        return {"shared": self.counters.shared,
                "keys": {name: {**({"role": keys[name].role, "priority": keys[name].priority,
                                    "limits": asdict(keys[name].limits)} if name in keys else {}),
                                **usage_summary(totals.get(name, {}))}
                         for name in sorted({*keys, *totals})}}

    @staticmethod
    async def _unless_unreachable(work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except CountersUnavailable as e:
            log.warning("the usage counters are unreachable: %s", e)


class KeyUse:
    """The key an admitted request came with, as the request's handling sees it: the priority it runs at, and
    where its tokens are counted (Generation does both)."""

    def __init__(self, key: APIKey, limiter: RateLimiter) -> None:
        self.key = key
        self.limiter = limiter

    def priority(self, asked: int | None) -> int:
        return self.key.priority_for(asked)

    async def count(self, output: RequestOutput) -> None:
        await self.limiter.count(self.key, output)

    def count_later(self, output: RequestOutput) -> None:
        self.limiter.count_later(self.key, output)


def key_use_of(request: Request) -> KeyUse | None:
    """The API key an admitted request came with, where it came with one."""
    return getattr(request.state, "key_use", None)


def refusal_error(key: APIKey, refused: Refusal) -> APIError:
    wait = max(1, math.ceil(refused.retry_after))
    return APIError(f"Rate limit reached for key {key.name!r} on {LIMIT_WORDS[refused.limit]}: limit "
                    f"{refused.allowed}. Retry after {wait} s.", HTTPStatus.TOO_MANY_REQUESTS,
                    headers={"Retry-After": str(wait)})


class RateLimitMiddleware:
    """Admits a keyed request to a generation route (APIKeyMiddleware, outside it, put the key in the scope's
    state) or answers 429; the place it takes in flight is given back before the client sees the response end, so a
    client that sends its next request at once finds it free."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = scope.get("state", {}).get("api_key") if scope["type"] == "http" else None
        if key is None or scope["method"] != "POST" or scope["path"] not in LIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        ticket = uuid.uuid4().hex
        refused = await self.limiter.admit(key, ticket)
        if refused is not None:
            error = refusal_error(key, refused)
            if scope["path"] in TGI_PATHS:  # TGI's clients read its own error JSON
                from localmoe.server.tgi import TGIError  # tgi.py imports this module

                error = TGIError.of(error)
            await error.response()(scope, receive, send)
            return
        scope["state"]["key_use"] = KeyUse(key, self.limiter)
        held = True

        async def give_back() -> None:
            nonlocal held
            if held:
                held = False
                await self.limiter.release(key, ticket)

        async def send_releasing(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                await give_back()
            await send(message)

        try:
            await self.app(scope, receive, send_releasing)
        finally:
            await asyncio.shield(give_back())


def rate_limiter(registry: CollectorRegistry, keys: list[APIKey], redis_url: str | None) -> RateLimiter:
    if redis_url is None:
        counters: Counters = LocalCounters()
    else:  # imported only here: the redis client imports OpenTelemetry's SDK where it is installed
        from localmoe.server.redis_counters import RedisCounters

        counters = RedisCounters(redis_url)
    return RateLimiter(counters, KeyMetrics(registry, keys), keys)


def add_usage_route(app: FastAPI, limiter: RateLimiter) -> None:
    @app.get(USAGE_PATH, include_in_schema=False)
    async def usage() -> dict[str, Any]:
        """Per key: requests admitted, prompt and completion tokens, rejections by limit (admin key only)."""
        return await limiter.usage()

"""What each API key has used: requests and tokens over a sliding minute (for its limits), requests in flight, and
totals (for /v1/stats/usage). LocalCounters keeps them in this process; RedisCounters (server/redis_counters.py)
in Redis, shared by every replica. Both decide with the same `refusal`, so a limit means the same in either."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

from localmoe.server.tenants import APIKey, Limits

WINDOW_SECONDS = 60.0  # the "minute" of requests_per_minute and tokens_per_minute, sliding
# a full max_concurrent_requests frees a slot when a request ends, which no window says: retry as soon as a 503 would
CONCURRENT_RETRY_SECONDS = 1.0
USAGE_FIELDS = ("requests", "prompt_tokens", "completion_tokens")
REJECTED = "rejected:"  # a totals field per limit: rejected:requests_per_minute, ...


class CountersUnavailable(RuntimeError):
    """The shared counters cannot be reached (Redis down); the server then admits without limits and says so."""


@dataclass
class Window:
    """One key's use over the last WINDOW_SECONDS, oldest first."""

    request_times: list[float]
    token_uses: list[tuple[float, int]]  # (when, prompt + completion tokens)
    in_flight: int


@dataclass(frozen=True)
class Refusal:
    limit: str  # the Limits field that refused
    allowed: int
    retry_after: float  # seconds until the window frees what one more request needs


def refusal(limits: Limits, window: Window, now: float) -> Refusal | None:
    """Why one more request of a key with `limits` and use `window` must wait, or None. Where several limits
    refuse, the one that frees last: retrying sooner would only be refused again."""
    found = []
    concurrent = limits.max_concurrent_requests
    if concurrent is not None and window.in_flight >= concurrent:
        found.append(Refusal("max_concurrent_requests", concurrent, CONCURRENT_RETRY_SECONDS))
    rpm = limits.requests_per_minute
    if rpm is not None and len(window.request_times) >= rpm:
        # one more fits once all but rpm - 1 of the window's requests have aged out
        found.append(Refusal("requests_per_minute", rpm, window.request_times[-rpm] + WINDOW_SECONDS - now))
    tpm = limits.tokens_per_minute
    used = sum(tokens for _, tokens in window.token_uses)
    if tpm is not None and used >= tpm:
        for when, tokens in window.token_uses:  # age uses out, oldest first, until the minute is under the limit
            used -= tokens
            if used < tpm:
                found.append(Refusal("tokens_per_minute", tpm, when + WINDOW_SECONDS - now))
                break
    return max(found, key=lambda r: r.retry_after, default=None)


def usage_summary(totals: dict[str, int]) -> dict:
    """A key's totals (LocalCounters' or Redis's fields) as /v1/stats/usage shows them."""
    summary = {name: int(totals.get(name, 0)) for name in USAGE_FIELDS}
    summary["total_tokens"] = summary["prompt_tokens"] + summary["completion_tokens"]
    summary["rejected"] = {name.removeprefix(REJECTED): int(count) for name, count in sorted(totals.items())
                           if name.startswith(REJECTED)}
    return summary


@dataclass
class _KeyState:
    request_times: deque[float] = field(default_factory=deque)
    token_uses: deque[tuple[float, int]] = field(default_factory=deque)
    in_flight: set[str] = field(default_factory=set)
    totals: Counter[str] = field(default_factory=Counter)

    def prune(self, now: float) -> None:
        while self.request_times and self.request_times[0] <= now - WINDOW_SECONDS:
            self.request_times.popleft()
        while self.token_uses and self.token_uses[0][0] <= now - WINDOW_SECONDS:
            self.token_uses.popleft()


class LocalCounters:
    """The counters of one process (no --redis-url). Every call runs on the event loop, so none interleave."""

    shared = False

    def __init__(self) -> None:
        self.keys: dict[str, _KeyState] = {}

    async def admit(self, key: APIKey, ticket: str) -> Refusal | None:
        """Take a place for one request of `key` (known by `ticket` when it ends), or say why not."""
        state = self.keys.setdefault(key.name, _KeyState())
        now = time.monotonic()
        state.prune(now)
        refused = refusal(key.limits, Window(list(state.request_times), list(state.token_uses),
                                             len(state.in_flight)), now)
        if refused is not None:
            state.totals[REJECTED + refused.limit] += 1
            return refused
        state.request_times.append(now)
        state.in_flight.add(ticket)
        state.totals["requests"] += 1
        return None

    async def release(self, key: APIKey, ticket: str) -> None:
        self.keys[key.name].in_flight.discard(ticket)

    async def add_tokens(self, key: APIKey, prompt: int, completion: int) -> None:
        state = self.keys.setdefault(key.name, _KeyState())
        state.token_uses.append((time.monotonic(), prompt + completion))
        state.totals["prompt_tokens"] += prompt
        state.totals["completion_tokens"] += completion

    async def totals(self) -> dict[str, dict[str, int]]:
        return {name: dict(state.totals) for name, state in self.keys.items()}

    async def close(self) -> None:
        pass

"""The usage counters in Redis (`--redis-url`), shared by every replica and process that names the same server.

Per key, three sorted sets scored by Redis's own clock (one clock for all replicas): request starts and token uses
over the last minute, and requests in flight. An admission reads them under WATCH, decides with the same
`refusal` as LocalCounters, and writes its place in one MULTI/EXEC, which Redis discards, to be read and decided
again, should another replica have admitted in between: two replicas can never both take the last place.
"""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as redis
from redis.exceptions import RedisError, WatchError

from localmoe.server.tenants import APIKey
from localmoe.server.usage_counters import (
    REJECTED, WINDOW_SECONDS, CountersUnavailable, Refusal, Window, refusal,
)

PREFIX = "localmoe:usage"
# a place in flight that a replica never gave back (it was killed mid-request) stops counting after this
IN_FLIGHT_LEASE_SECONDS = 3600.0
TIMEOUT_SECONDS = 2.0  # a Redis that does not answer in this long is down: the request goes on without limits


class RedisCounters:
    shared = True

    def __init__(self, url: str) -> None:
        self.redis = redis.from_url(url, decode_responses=True, socket_timeout=TIMEOUT_SECONDS,
                                    socket_connect_timeout=TIMEOUT_SECONDS)
        self.url = url

    def _keys(self, name: str) -> tuple[str, str, str, str]:
        base = f"{PREFIX}:{name}"
        return f"{base}:requests", f"{base}:tokens", f"{base}:in_flight", f"{base}:totals"

    async def check(self) -> None:
        try:
            await self.redis.ping()
        except (RedisError, OSError) as e:
            raise CountersUnavailable(f"cannot reach Redis at {self.url}: {e}") from None

    async def admit(self, key: APIKey, ticket: str) -> Refusal | None:
        requests, tokens, in_flight, totals = self._keys(key.name)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        await pipe.watch(requests, tokens, in_flight)
                        seconds, micros = await pipe.time()
                        now = seconds + micros / 1e6
                        start = now - WINDOW_SECONDS
                        times = await pipe.zrangebyscore(requests, f"({start}", "+inf", withscores=True)
                        uses = await pipe.zrangebyscore(tokens, f"({start}", "+inf", withscores=True)
                        busy = await pipe.zcount(in_flight, f"({now - IN_FLIGHT_LEASE_SECONDS}", "+inf")
                        window = Window([when for _, when in times],
                                        [(when, int(member.rsplit(":", 1)[1])) for member, when in uses], busy)
                        refused = refusal(key.limits, window, now)
                        pipe.multi()
                        pipe.zremrangebyscore(requests, "-inf", start)
                        pipe.zremrangebyscore(tokens, "-inf", start)
                        pipe.zremrangebyscore(in_flight, "-inf", now - IN_FLIGHT_LEASE_SECONDS)
                        if refused is None:
                            pipe.zadd(requests, {ticket: now})
                            pipe.zadd(in_flight, {ticket: now})
                            pipe.hincrby(totals, "requests", 1)
                        else:
                            pipe.hincrby(totals, REJECTED + refused.limit, 1)
                        pipe.expire(requests, int(WINDOW_SECONDS) + 1)
                        pipe.expire(in_flight, int(IN_FLIGHT_LEASE_SECONDS))
                        pipe.sadd(f"{PREFIX}:keys", key.name)
                        await pipe.execute()
                        return refused
                    except WatchError:
                        continue
        except (RedisError, OSError) as e:
            raise CountersUnavailable(str(e)) from None

    async def release(self, key: APIKey, ticket: str) -> None:
        try:
            await self.redis.zrem(self._keys(key.name)[2], ticket)
        except (RedisError, OSError) as e:
            raise CountersUnavailable(str(e)) from None

    async def add_tokens(self, key: APIKey, prompt: int, completion: int) -> None:
        _, tokens, _, totals = self._keys(key.name)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                seconds, micros = await self.redis.time()
                now = seconds + micros / 1e6
                # a member is unique in its set (a random part), and carries the count
                pipe.zadd(tokens, {f"{uuid.uuid4().hex}:{prompt + completion}": now})
                pipe.expire(tokens, int(WINDOW_SECONDS) + 1)
                pipe.hincrby(totals, "prompt_tokens", prompt)
                pipe.hincrby(totals, "completion_tokens", completion)
                pipe.sadd(f"{PREFIX}:keys", key.name)
                await pipe.execute()
        except (RedisError, OSError) as e:
            raise CountersUnavailable(str(e)) from None

    async def totals(self) -> dict[str, dict[str, int]]:
        try:
            names = sorted(await self.redis.smembers(f"{PREFIX}:keys"))
            async with self.redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(self._keys(name)[3])
                read = await pipe.execute()
        except (RedisError, OSError) as e:
            raise CountersUnavailable(str(e)) from None
        return {name: {field: int(value) for field, value in fields.items()} for name, fields in zip(names, read)}

    async def close(self) -> None:
        await self.redis.aclose()


def check_redis(url: str) -> None:
    """Refuse to start against a Redis that cannot be reached, before the models load (on a client of its own: an
    asyncio client belongs to the event loop it first ran on)."""
    async def ping() -> None:
        counters = RedisCounters(url)
        try:
            await counters.check()
        finally:
            await counters.close()
    asyncio.run(ping())

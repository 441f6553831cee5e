"""LocalMoE's own statistics routes: /v1/stats/experts, /v1/stats/memory, /v1/stats/performance and
/v1/stats/history.

Experts and memory come from the engine's latest stats snapshot (engine/stats.py: memory counted from the
tensors themselves, weights, KV pool, swap space, expert cache slots, the expert store's host copy), with the
process's resident set size as the OS reports it added here. Performance is a window over the most recent
finished requests: throughput, and TTFT / TPOT / end-to-end percentiles. History is a bounded ring of samples of
all of these, taken every few seconds, so /dashboard can draw the last minutes even when opened just now.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from localmoe.engine.stats import SpecDecodeStats
from localmoe.experts.memory_budget import resident_bytes
from localmoe.outputs import RequestOutput

PERCENTILES = (50, 90, 99)


def process_rss_bytes() -> int | None:
    """Resident set size of this process (Linux /proc), None where unknown."""
    try:
        return resident_bytes()
    except (OSError, ValueError):
        return None


@dataclass
class _Finished:
    at: float  # when it finished (time.monotonic, as the engine stamps requests)
    arrival: float
    prompt_tokens: int
    output_tokens: int
    ttft: float | None
    tpot: float | None
    e2e: float | None


def _percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    if len(values) == 1:
        return {"mean": values[0], **{f"p{p}": values[0] for p in PERCENTILES}}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"mean": statistics.fmean(values), **{f"p{p}": cuts[p - 1] for p in PERCENTILES}}


class PerformanceWindow:
    """The last `window_s` seconds (at most `max_requests` requests) of finished requests."""

    def __init__(self, window_s: float = 60.0, max_requests: int = 10_000) -> None:
        self.window_s = window_s
        self.finished: deque[_Finished] = deque(maxlen=max_requests)

    def observe(self, output: RequestOutput) -> None:
        times = output.metrics
        arrival, first, done = (times.get(k) for k in ("arrival_time", "first_token_time", "finished_time"))
        if arrival is None or done is None:
            return
        steps = max(len(c.token_ids) for c in output.outputs)
        self.finished.append(_Finished(
            at=done, arrival=arrival, prompt_tokens=len(output.prompt_token_ids),
            output_tokens=sum(len(c.token_ids) for c in output.outputs),
            ttft=first - arrival if first is not None else None,
            tpot=(done - first) / (steps - 1) if first is not None and steps > 1 else None,
            e2e=done - arrival))

    def summary(self, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        recent = [r for r in self.finished if r.at >= now - self.window_s]
        span = now - min(r.arrival for r in recent) if recent else 0.0
        span = min(max(span, 1e-9), self.window_s) if recent else 0.0
        return {
            "object": "performance_stats", "window_s": self.window_s, "num_requests": len(recent),
            "output_tokens_per_s": sum(r.output_tokens for r in recent) / span if recent else 0.0,
            "prompt_tokens_per_s": sum(r.prompt_tokens for r in recent) / span if recent else 0.0,
            "requests_per_s": len(recent) / span if recent else 0.0,
            "ttft_s": _percentiles([r.ttft for r in recent if r.ttft is not None]),
            "tpot_s": _percentiles([r.tpot for r in recent if r.tpot is not None]),
            "e2e_s": _percentiles([r.e2e for r in recent if r.e2e is not None]),
        }


def spec_decode_summary(stats: SpecDecodeStats | None) -> dict[str, Any] | None:
    """Speculative decoding since the engine started (/v1/stats/performance), None when it does not speculate:
    vLLM's counters, the acceptance rate, and the mean tokens a verifying step gives a sequence."""
    if stats is None:
        return None
    return {**asdict(stats), "num_accepted_tokens_per_pos": list(stats.num_accepted_tokens_per_pos),
            "acceptance_rate": stats.acceptance_rate,
            "mean_acceptance_length": 1 + stats.num_accepted_tokens / stats.num_drafts if stats.num_drafts else None}


HISTORY_INTERVAL_S = 2.0
HISTORY_LENGTH = 150  # samples: the last five minutes


@dataclass(frozen=True)
class HistorySample:
    """One moment for /dashboard: gauges as they stood, rates over the interval since the previous sample."""

    running: int
    waiting: int
    kv_cache_usage: float
    prompt_tokens_per_s: float
    generation_tokens_per_s: float
    requests_per_s: float  # finished
    client_errors_per_s: float  # 4xx responses
    server_errors_per_s: float  # 5xx responses, the 503s of a full queue included
    ttft_s: dict[str, float] | None  # percentiles over PerformanceWindow's window
    tpot_s: dict[str, float] | None
    process_rss_bytes: int | None
    kv_cache_used_bytes: int
    expert_cache_bytes: int
    device_allocated_bytes: int | None  # CUDA only
    expert_cache_hit_rate: float | None  # over the interval; None without offloading or without lookups


class StatsHistory:
    """The ring of samples behind /v1/stats/history, taken on the event loop from what the engine published (its
    snapshot) and what the server counted (ServerMetrics.totals, the performance window)."""

    def __init__(self, read_snapshot: Callable[[], Any], read_totals: Callable[[], dict[str, float]],
                 performance: PerformanceWindow, interval_s: float = HISTORY_INTERVAL_S,
                 length: int = HISTORY_LENGTH) -> None:
        self.read_snapshot = read_snapshot
        self.read_totals = read_totals
        self.performance = performance
        self.interval_s = interval_s
        self.samples: deque[tuple[float, HistorySample]] = deque(maxlen=length)
        self.last: tuple[float, Any, dict[str, float]] | None = None  # when, snapshot, totals of the last sample

    def sample(self) -> None:
        now, snapshot, totals = time.monotonic(), self.read_snapshot(), self.read_totals()
        if self.last is None:
            self.last = (now, snapshot, totals)
            return
        then, before, totals_before = self.last
        span = max(now - then, 1e-9)
        stats, was = snapshot.engine, before.engine
        memory, performance = snapshot.memory, self.performance.summary(now)
        self.samples.append((now, HistorySample(
            running=stats.num_running, waiting=stats.num_waiting, kv_cache_usage=stats.kv_cache_usage,
            prompt_tokens_per_s=(stats.prompt_tokens_total - was.prompt_tokens_total) / span,
            generation_tokens_per_s=(stats.generation_tokens_total - was.generation_tokens_total) / span,
            requests_per_s=(totals["requests"] - totals_before["requests"]) / span,
            client_errors_per_s=(totals["4xx"] - totals_before["4xx"]) / span,
            server_errors_per_s=(totals["5xx"] - totals_before["5xx"]) / span,
            ttft_s=performance["ttft_s"], tpot_s=performance["tpot_s"], process_rss_bytes=process_rss_bytes(),
            kv_cache_used_bytes=round(memory["kv_cache"]["bytes"] * stats.kv_cache_usage),
            expert_cache_bytes=memory["expert_cache"]["resident_bytes"],
            device_allocated_bytes=memory["device"].get("allocated_bytes"),
            expert_cache_hit_rate=_hit_rate(snapshot.experts, before.experts))))
        self.last = (now, snapshot, totals)

    def summary(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"object": "stats_history", "interval_s": self.interval_s,
                "samples": [{"age_s": now - at, **asdict(sample)} for at, sample in self.samples]}

    async def run(self) -> None:
        """Sample every interval until cancelled (the app's lifespan runs it)."""
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)


def _hit_rate(experts: dict[str, Any], before: dict[str, Any]) -> float | None:
    if not experts.get("offloading") or not before.get("totals"):
        return None
    now, was = experts["totals"], before["totals"]
    hits, misses = now["cache_hits"] - was["cache_hits"], now["cache_misses"] - was["cache_misses"]
    return hits / (hits + misses) if hits + misses else None

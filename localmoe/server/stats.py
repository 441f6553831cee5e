"""LocalMoE's own statistics routes: /v1/stats/experts, /v1/stats/memory and /v1/stats/performance.

Experts and memory come from the engine's latest stats snapshot (engine/stats.py: memory counted from the
tensors themselves, weights, KV pool, swap space, expert cache slots, the expert store's host copy), with the
process's resident set size as the OS reports it added here. Performance is a window over the most recent
finished requests: throughput, and TTFT / TPOT / end-to-end percentiles.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

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

"""The engine's published statistics: a snapshot the engine thread replaces, never the live objects.

After each step (at most every PUBLISH_INTERVAL_S while busy, and whenever it falls idle) the engine builds a
StatsSnapshot: its counters and gauges (EngineStats, vLLM v1's SchedulerStats), the expert statistics
(experts/stats.py) and the memory it holds. The server's /metrics, /v1/stats/* and /dashboard read the latest
snapshot from the event loop; a snapshot is never changed once published, so a reader sees one moment of the
engine, whole, while the engine thread goes on mutating its scheduler, caches and pools.

What only the engine loop sees step by step (tokens per step, the gaps between a request's tokens, when a request
was first scheduled) is kept by LoopStats on the same thread and published the same way, as a LoopSnapshot of
histograms (vLLM v1's IterationStats); LoopStats also writes vLLM's periodic "Avg prompt throughput" log line.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from localmoe.experts.cpu import packed_bytes
from localmoe.experts.runtime import ServingExperts
from localmoe.layers.kv_cache_dtype import dtype_name
from localmoe.layers.moe import moe_blocks
from localmoe.outputs import RequestOutput

if TYPE_CHECKING:
    from localmoe.engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)

PUBLISH_INTERVAL_S = 0.1  # building a snapshot takes ~0.1-0.3 ms; at most ten a second while steps run
# vLLM's environment variable for the period of its log line, and its default
LOG_STATS_INTERVAL_S = float(os.environ.get("VLLM_LOG_STATS_INTERVAL", "10"))

# vLLM's buckets, so that its dashboards' histogram_quantile() reads the same resolution from us
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
INTER_TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                               10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)


@dataclass(frozen=True)
class SpecDecodeStats:
    """vLLM's spec_decode counters: steps in which a sequence verified drafts, draft tokens verified, draft tokens
    accepted, and accepted ones by their position in the draft (engine/spec_decode.py)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: tuple[int, ...] = ()

    @property
    def acceptance_rate(self) -> float | None:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None


@dataclass(frozen=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_blocks_total: int = 0
    num_free_blocks: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions_total: int = 0
    num_swapped_out_total: int = 0
    num_prefill_chunks_total: int = 0
    spec_decode: SpecDecodeStats | None = None  # with speculative decoding on


@dataclass(frozen=True)
class StatsSnapshot:
    engine: EngineStats = field(default_factory=EngineStats)
    experts: dict[str, Any] = field(default_factory=dict)  # as /v1/stats/experts answers
    memory: dict[str, Any] = field(default_factory=dict)  # as /v1/stats/memory answers, less the process's RSS
    at: float = 0.0  # time.monotonic() when taken


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def weights_bytes(model: nn.Module, experts: ServingExperts) -> int:
    """Bytes of the weights the model holds, each tensor once (tied weights share storage; offloaded experts'
    slots are the cache's, counted there; shape-only tensors hold none)."""
    slots = {s.data_ptr() for c in experts.caches for s in c.slots.values()}
    held = {id(t) if t.is_mkldnn else t.data_ptr(): t for t in (*model.parameters(), *model.buffers())
            if t.device.type != "meta" and (t.is_mkldnn or t.data_ptr() not in slots)}
    return tensor_bytes(held.values()) + sum(packed_bytes(m) for m in model.modules())


def routed_expert_bytes(model: nn.Module) -> int:
    """Bytes of the routed experts this process holds (under expert parallelism, this rank's)."""
    return sum(tensor_bytes((*moe.experts.parameters(), *moe.experts.buffers()))
               + sum(packed_bytes(m) for m in moe.experts.modules()) for _, moe in moe_blocks(model))


@dataclass
class MemoryAccount:
    """The memory pools an engine holds: their sizes are fixed at start, their use is read at each snapshot."""

    device: torch.device
    weights_bytes: int
    kv_bytes: int  # the pool as allocated: with fp8 rows, their scales' bytes included
    kv_dtype: torch.dtype
    swap_bytes: int
    experts: ServingExperts

    def snapshot(self, num_blocks: int, num_free_blocks: int, usage: float,
                 rank_caches: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """`rank_caches`: each rank's expert caches (expert parallelism with offloading, ModelRunner.rank_caches):
        the expert cache's bytes are then their sum, and each rank's are listed under `ranks`."""
        expert_cache = expert_cache_memory(self.experts)
        if rank_caches:
            ranks = [rank["memory"] for rank in rank_caches]
            expert_cache |= {key: sum(rank[key] for rank in ranks) for key in
                             ("slots", "budget_bytes", "resident_bytes", "store_host_bytes")}
            expert_cache |= {"experts_per_layer": sum(rank["experts_per_layer"] for rank in ranks),
                             "ranks": [{"rank": r, **rank} for r, rank in enumerate(ranks)]}
        device: dict[str, Any] = {"type": self.device.type}
        if self.device.type == "cuda":
            device |= {"allocated_bytes": torch.cuda.memory_allocated(self.device),
                       "reserved_bytes": torch.cuda.memory_reserved(self.device)}
        return {
            "object": "memory_stats",
            "device": device,
            "weights_bytes": self.weights_bytes,
            "kv_cache": {"bytes": self.kv_bytes, "dtype": dtype_name(self.kv_dtype), "num_blocks": num_blocks,
                         "num_free_blocks": num_free_blocks, "usage": usage, "swap_bytes": self.swap_bytes},
            "expert_cache": expert_cache,
        }


def expert_cache_memory(experts: ServingExperts) -> dict[str, Any]:
    """The expert cache's slots and bytes in this process, and its store's host copy."""
    caches, store = experts.caches, experts.store
    pools = list({id(c.pool): c.pool for c in caches}.values())
    return {
        "enabled": bool(caches),
        "experts_per_layer": sum(p.capacity for p in pools) / len(caches) if caches else 0,
        "slots": sum(p.capacity for p in pools),
        "shared_slots": len(pools) < len(caches),  # layers share slots (experts/cache.py's SlotPool)
        "policy": caches[0].policy if caches else None,
        "offload_target": store.target if store is not None else None,
        "budget_bytes": sum(p.nbytes for p in pools),
        "resident_bytes": sum(c.resident_bytes for c in caches),
        "store_host_bytes": store.host_bytes() if store is not None else 0,
    }



@dataclass(frozen=True)
class HistogramSnapshot:
    """A histogram as Prometheus exposes it: observations at or below each bound (cumulative), the last entry
    counting all of them (+Inf), and their sum."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    total: float = 0.0


class HistogramCounter:
    """A histogram the engine thread observes into; only its snapshots leave the thread."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket, the last one past every bound
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # a bound holds values <= it, as Prometheus' le does
        self.total += value

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.bounds, tuple(itertools.accumulate(self.counts)), self.total)


@dataclass(frozen=True)
class LoopSnapshot:
    """The engine loop's histograms, each named after the field of vLLM's metric it feeds."""

    iteration_tokens: HistogramSnapshot  # tokens per step: prompts that got their first token, plus tokens generated
    inter_token_latency: HistogramSnapshot  # seconds between a request's consecutive steps with a new token
    queue_time: HistogramSnapshot  # arrival -> first scheduled
    prefill_time: HistogramSnapshot  # first scheduled -> first token
    decode_time: HistogramSnapshot  # first token -> last token
    inference_time: HistogramSnapshot  # first scheduled -> last token
    prompt_throughput: float = 0.0  # tokens/s over the last log interval, as the log line says
    generation_throughput: float = 0.0


LOOP_HISTOGRAMS = {"iteration_tokens": ITERATION_TOKENS_BUCKETS, "inter_token_latency": INTER_TOKEN_LATENCY_BUCKETS,
                   **{phase: REQUEST_LATENCY_BUCKETS
                      for phase in ("queue_time", "prefill_time", "decode_time", "inference_time")}}


class LoopStats:
    """Statistics only the engine loop sees, kept on its thread after every step and published as a LoopSnapshot
    (at most every PUBLISH_INTERVAL_S while busy, at once when the engine is idle); and, every
    LOG_STATS_INTERVAL_S, vLLM's log line, which operators and the serving guides grep for."""

    def __init__(self, engine: LLMEngine, log_interval_s: float = LOG_STATS_INTERVAL_S, log_lines: bool = True) -> None:
        self.engine = engine
        self.log_lines = log_lines  # --disable-log-stats: the interval's throughputs are still measured, not logged
        self.histograms = {name: HistogramCounter(bounds) for name, bounds in LOOP_HISTOGRAMS.items()}
        self.scheduled_at: dict[str, float] = {}  # request id -> the start of the first step that computed it
        self.last_token_at: dict[str, float] = {}  # request id -> when its latest token came out
        self.generation_tokens_total = engine.generation_tokens_total
        self.log_interval_s = log_interval_s
        self.logged_at = time.monotonic()
        self.logged_stats = engine.snapshot.engine
        self.interval_tokens = [0, 0]  # prompt, generation tokens since the last log line
        self.last_throughput = (0.0, 0.0)  # tokens/s over the last log interval: prompt, generation
        self.published, self.published_at = self._snapshot(), 0.0

    def _snapshot(self) -> LoopSnapshot:
        return LoopSnapshot(**{name: h.snapshot() for name, h in self.histograms.items()},
                            prompt_throughput=self.last_throughput[0], generation_throughput=self.last_throughput[1])

    def after_step(self, outputs: list[RequestOutput], started: float) -> None:
        """Account one step that began at `started` (time.monotonic) and produced `outputs`."""
        now = time.monotonic()
        for request_id, request in self.engine.requests.items():
            if request_id not in self.scheduled_at and any(seq.num_computed_tokens for seq in request.seqs):
                self.scheduled_at[request_id] = started
        prompt_tokens = 0
        for output in outputs:
            request_id = output.request_id
            scheduled = self.scheduled_at.setdefault(request_id, started)
            last = self.last_token_at.get(request_id)
            if last is None:
                prompt_tokens += len(output.prompt_token_ids)
            else:
                self.histograms["inter_token_latency"].observe(now - last)
            self.last_token_at[request_id] = now
            if output.finished:
                self._finished(output, scheduled)
        generated = self.engine.generation_tokens_total - self.generation_tokens_total
        self.generation_tokens_total = self.engine.generation_tokens_total
        self.histograms["iteration_tokens"].observe(prompt_tokens + generated)
        self.interval_tokens[0] += prompt_tokens
        self.interval_tokens[1] += generated
        if not self.engine.requests or now - self.published_at >= PUBLISH_INTERVAL_S:
            self.publish(now)

    def _finished(self, output: RequestOutput, scheduled: float) -> None:
        del self.scheduled_at[output.request_id], self.last_token_at[output.request_id]
        times = output.metrics
        arrival, first, done = (times.get(k) for k in ("arrival_time", "first_token_time", "finished_time"))
        if arrival is None or first is None or done is None:
            return
        for name, seconds in (("queue_time", scheduled - arrival), ("prefill_time", first - scheduled),
                              ("decode_time", done - first), ("inference_time", done - scheduled)):
            self.histograms[name].observe(max(seconds, 0.0))

    def publish(self, now: float) -> None:
        self.published = self._snapshot()
        self.published_at = now

    def tick(self) -> None:
        """Between steps (and at least every second while idle): write the log line when its interval is up, and
        forget requests that left the engine without finishing (aborted)."""
        now = time.monotonic()
        if now - self.logged_at < self.log_interval_s:
            return
        live = self.engine.requests
        self.scheduled_at = {r: t for r, t in self.scheduled_at.items() if r in live}
        self.last_token_at = {r: t for r, t in self.last_token_at.items() if r in live}
        self._log(now)
        self.publish(now)

    @staticmethod
    def _log_spec_decode(stats: SpecDecodeStats | None, before: SpecDecodeStats | None, elapsed: float) -> None:
        """vLLM's "SpecDecoding metrics" line over the interval, when drafts were verified in it."""
        if stats is None or before is None or stats.num_drafts == before.num_drafts:
            return
        drafts = stats.num_drafts - before.num_drafts
        drafted = stats.num_draft_tokens - before.num_draft_tokens
        accepted = stats.num_accepted_tokens - before.num_accepted_tokens
        per_pos = ", ".join(f"{(now - was) / drafts:.3f}" for now, was in
                            zip(stats.num_accepted_tokens_per_pos, before.num_accepted_tokens_per_pos))
        log.info("SpecDecoding metrics: Mean acceptance length: %.2f, Accepted throughput: %.2f tokens/s, Drafted "
                 "throughput: %.2f tokens/s, Accepted: %d tokens, Drafted: %d tokens, Per-position acceptance rate: "
                 "%s, Avg Draft acceptance rate: %.1f%%", 1 + accepted / drafts, accepted / elapsed,
                 drafted / elapsed, accepted, drafted, per_pos, 100 * accepted / drafted)

    def _log(self, now: float) -> None:
        """vLLM's line (vllm/v1/metrics/loggers.py, LoggingStatLogger.log) in its words, over the interval since the
        last one: throughputs from the steps, the rest from the engine's published snapshot."""
        stats = self.engine.snapshot.engine
        elapsed = now - self.logged_at
        prompt, generation = (tokens / elapsed for tokens in self.interval_tokens)
        queries = stats.prefix_cache_queries - self.logged_stats.prefix_cache_queries
        hits = stats.prefix_cache_hits - self.logged_stats.prefix_cache_hits
        preemptions = stats.num_preemptions_total - self.logged_stats.num_preemptions_total
        parts = ["Avg prompt throughput: %.1f tokens/s", "Avg generation throughput: %.1f tokens/s",
                 "Running: %d reqs", "Waiting: %d reqs"]
        args: list[float] = [prompt, generation, stats.num_running, stats.num_waiting]
        if preemptions:
            parts.append("Preemptions: %d")
            args.append(preemptions)
        parts += ["GPU KV cache usage: %.1f%%", "Prefix cache hit rate: %.1f%%"]
        args += [100 * stats.kv_cache_usage, 100 * hits / queries if queries else 0.0]
        idle = not any((prompt, generation, *self.last_throughput))  # as vLLM: an idle server logs at debug
        if self.log_lines:
            log.log(logging.DEBUG if idle else logging.INFO, "Engine 000: " + ", ".join(parts), *args)
            self._log_spec_decode(stats.spec_decode, self.logged_stats.spec_decode, elapsed)
        self.logged_at, self.logged_stats = now, stats
        self.interval_tokens = [0, 0]
        self.last_throughput = (prompt, generation)

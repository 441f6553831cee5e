"""The engine's published statistics: a snapshot the engine thread replaces, never the live objects.

After each step (at most every PUBLISH_INTERVAL_S while busy, and whenever it falls idle) the engine builds a
StatsSnapshot: its counters and gauges (EngineStats, vLLM v1's SchedulerStats), the expert statistics
(experts/stats.py) and the memory it holds. The server's /metrics, /v1/stats/* and /dashboard read the latest
snapshot from the event loop; a snapshot is never changed once published, so a reader sees one moment of the
engine, whole, while the engine thread goes on mutating its scheduler, caches and pools.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from localmoe.experts.cpu import packed_bytes
from localmoe.experts.runtime import ServingExperts
from localmoe.layers.kv_cache_dtype import dtype_name

PUBLISH_INTERVAL_S = 0.1  # building a snapshot takes ~0.1-0.3 ms; at most ten a second while steps run


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


@dataclass
class MemoryAccount:
    """The memory pools an engine holds: their sizes are fixed at start, their use is read at each snapshot."""

    device: torch.device
    weights_bytes: int
    kv_bytes: int  # the pool as allocated: with fp8 rows, their scales' bytes included
    kv_dtype: torch.dtype
    swap_bytes: int
    experts: ServingExperts

    def snapshot(self, num_blocks: int, num_free_blocks: int, usage: float) -> dict[str, Any]:
        caches, store = self.experts.caches, self.experts.store
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
            "expert_cache": {
                "enabled": bool(caches),
                "experts_per_layer": caches[0].capacity if caches else 0,
                "policy": caches[0].policy if caches else None,
                "offload_target": store.target if store is not None else None,
                "budget_bytes": sum(c.budget_bytes for c in caches),
                "resident_bytes": sum(c.resident_bytes for c in caches),
                "store_host_bytes": store.host_bytes() if store is not None else 0,
            },
        }


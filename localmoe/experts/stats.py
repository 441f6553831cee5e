"""Expert statistics: what every MoE layer's experts did since the model loaded.

Per layer and expert: tokens routed, and with offloading the cache's hits, misses, bytes moved and prefetch
accuracy; per layer the load imbalance, max over mean tokens per expert (1.0 is perfectly even). Built on the
engine thread from the routing observer's counts and the caches' own (the engine publishes it in its stats
snapshot), read by /v1/stats/experts, the Prometheus collector and the dashboard.
"""

from __future__ import annotations

from typing import Any

import torch

from localmoe.distributed.expert_parallel import ExpertParallelExperts
from localmoe.distributed.expert_placement import rank_imbalance, rank_tokens
from localmoe.experts.cache import ExpertCache
from localmoe.experts.observer import RoutingObserver
from localmoe.experts.offload import OffloadedExperts


def load_imbalance(tokens: list[int]) -> float:
    """max / mean tokens per expert; 0.0 before any token was routed."""
    total = sum(tokens)
    return max(tokens) * len(tokens) / total if total else 0.0


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def cache_stats(cache: ExpertCache) -> dict[str, Any]:
    """Per expert lists (hits, misses, bytes and prefetch counts) and the layer's totals."""
    stats = cache.stats
    hits, misses = stats.hits.tolist(), stats.misses.tolist()
    return {
        "capacity": cache.capacity, "policy": cache.policy, "steps": cache.clock,
        "hits": hits, "misses": misses, "hit_rate": stats.hit_rate,
        "bytes_loaded_per_expert": stats.loaded_bytes.tolist(),
        "prefetched_per_expert": stats.prefetches.tolist(), "prefetch_used_per_expert": stats.prefetch_hits.tolist(),
        "bytes_loaded": stats.bytes_loaded,
        "resident_experts": sorted(cache.expert_slot), "resident_bytes": cache.resident_bytes,
        "budget_bytes": cache.budget_bytes, "shared_slots": len(cache.pool.layers) > 1,
        "prefetched": stats.prefetched, "prefetch_used": stats.prefetch_used,
        "prefetch_accuracy": _ratio(stats.prefetch_used, stats.prefetched),
    }


def expert_parallel_stats(observer: RoutingObserver, world: int) -> dict[str, Any] | None:
    """Tokens per rank (its experts' tokens) over the MoE layers, and the imbalance across ranks (rank_imbalance:
    the mean over layers of max / mean); None unless the experts are spread over ranks."""
    if not all(isinstance(moe.experts, ExpertParallelExperts) for moe in observer.blocks) or not observer.blocks:
        return None
    owners = torch.stack([moe.experts.owner for moe in observer.blocks])
    per_rank = rank_tokens(observer.tokens[:, :owners.shape[1]], owners, world)
    return {"tokens_per_rank": per_rank.sum(dim=0).tolist(), "rank_imbalance": rank_imbalance(per_rank),
            "tokens_per_rank_per_layer": per_rank.tolist(), "experts_per_rank": [
                torch.bincount(owner, minlength=world).tolist() for owner in owners]}


def expert_stats(observer: RoutingObserver, parallel: dict[str, Any] | None = None) -> dict[str, Any]:
    """The statistics /v1/stats/experts answers; `parallel`: the tensor/expert-parallel engine's own (its size and
    the bytes its collectives moved), to which the tokens per rank are added under expert parallelism."""
    layers = []
    for index, moe, tokens in zip(observer.layer_indices, observer.blocks, observer.tokens.tolist()):
        tokens = tokens[:moe.num_experts]
        experts = moe.experts
        layers.append({"layer": index, "num_experts": moe.num_experts, "top_k": moe.top_k, "tokens": tokens,
                       "load_imbalance": load_imbalance(tokens),
                       "cache": cache_stats(experts.cache) if isinstance(experts, OffloadedExperts) else None})
    caches = [layer["cache"] for layer in layers if layer["cache"] is not None]
    hits = sum(sum(c["hits"]) for c in caches)
    misses = sum(sum(c["misses"]) for c in caches)
    prefetched = sum(c["prefetched"] for c in caches)
    prefetch_used = sum(c["prefetch_used"] for c in caches)
    totals = {
        "tokens_routed": sum(sum(layer["tokens"]) for layer in layers),
        "cache_hits": hits, "cache_misses": misses, "cache_hit_rate": _ratio(hits, hits + misses),
        "bytes_loaded": sum(c["bytes_loaded"] for c in caches),
        "prefetched": prefetched, "prefetch_used": prefetch_used,
        "prefetch_accuracy": _ratio(prefetch_used, prefetched),
    }
    if parallel is not None:
        parallel = {**parallel, "expert_parallel": expert_parallel_stats(observer, parallel["expert_parallel_size"])}
    return {"object": "expert_stats", "offloading": bool(caches), "layers": layers, "totals": totals,
            "parallel": parallel}

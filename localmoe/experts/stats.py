"""Expert statistics: what every MoE layer's experts did since the model loaded.

Per layer and expert: tokens routed, and with offloading the cache's hits, misses, bytes moved and prefetch
accuracy; per layer the load imbalance, max over mean tokens per expert (1.0 is perfectly even). Built on the
engine thread from the routing observer's counts and the caches' own (the engine publishes it in its stats
snapshot), read by /v1/stats/experts, the Prometheus collector and the dashboard.

Under expert parallelism with offloading each rank's caches count its own experts: every rank reports its layers'
cache statistics by the layer's expert ids (`rank_caches`), rank 0 adds them up per layer (each expert is one rank's,
so its counts are that rank's) and keeps each rank's totals under `parallel.ranks`.
"""

from __future__ import annotations

from typing import Any

import torch

from localmoe.distributed.expert_parallel import ExpertParallelExperts
from localmoe.distributed.expert_placement import rank_imbalance, rank_tokens
from localmoe.experts.cache import ExpertCache
from localmoe.experts.observer import RoutingObserver
from localmoe.experts.offload import OffloadedExperts, served
from localmoe.layers.moe import SparseMoE

PER_EXPERT = ("hits", "misses", "bytes_loaded_per_expert", "prefetched_per_expert", "prefetch_used_per_expert")
SUMMED = ("capacity", "bytes_loaded", "resident_bytes", "budget_bytes", "prefetched", "prefetch_used")


def load_imbalance(tokens: list[int]) -> float:
    """max / mean tokens per expert; 0.0 before any token was routed."""
    total = sum(tokens)
    return max(tokens) * len(tokens) / total if total else 0.0


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def cache_stats(cache: ExpertCache, num_experts: int) -> dict[str, Any]:
    """Per expert lists (hits, misses, bytes and prefetch counts) over the layer's `num_experts` (those the cache
    does not serve, another rank's, count zero) and the layer's totals."""
    stats, held = cache.stats, cache.store.layers[cache.path].held

    def per_expert(counts: torch.Tensor) -> list[int]:
        return torch.zeros(num_experts, dtype=torch.long).index_put_((torch.tensor(held),), counts).tolist()
    return {
        "capacity": cache.capacity, "policy": cache.policy, "steps": cache.clock,
        "hits": per_expert(stats.hits), "misses": per_expert(stats.misses), "hit_rate": stats.hit_rate,
        "bytes_loaded_per_expert": per_expert(stats.loaded_bytes),
        "prefetched_per_expert": per_expert(stats.prefetches),
        "prefetch_used_per_expert": per_expert(stats.prefetch_hits),
        "bytes_loaded": stats.bytes_loaded,
        "resident_experts": sorted(held[e] for e in cache.expert_slot), "resident_bytes": cache.resident_bytes,
        "budget_bytes": cache.budget_bytes, "shared_slots": len(cache.pool.layers) > 1,
        "prefetched": stats.prefetched, "prefetch_used": stats.prefetch_used,
        "prefetch_accuracy": _ratio(stats.prefetch_used, stats.prefetched),
    }


def layer_caches(blocks: list[SparseMoE]) -> list[dict[str, Any] | None]:
    """Each MoE layer's cache statistics in this process (None where its experts are resident)."""
    return [cache_stats(served(moe).cache, moe.num_experts) if isinstance(served(moe), OffloadedExperts) else None
            for moe in blocks]


def merge_caches(layers: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """One layer's cache statistics over the ranks (`layers`: each rank's for the layer): the counts added up."""
    ranks = [layer for layer in layers if layer is not None]
    if not ranks:
        return None
    merged = {**ranks[0], "steps": max(r["steps"] for r in ranks),
              "shared_slots": any(r["shared_slots"] for r in ranks),
              "resident_experts": sorted(e for r in ranks for e in r["resident_experts"])}
    merged |= {key: [sum(counts) for counts in zip(*(r[key] for r in ranks))] for key in PER_EXPERT}
    merged |= {key: sum(r[key] for r in ranks) for key in SUMMED}
    hits, misses = sum(merged["hits"]), sum(merged["misses"])
    return merged | {"hit_rate": _ratio(hits, hits + misses),
                     "prefetch_accuracy": _ratio(merged["prefetch_used"], merged["prefetched"])}


def cache_totals(layers: list[dict[str, Any] | None]) -> dict[str, Any]:
    """The caches' totals over the MoE layers."""
    caches = [layer for layer in layers if layer is not None]
    hits = sum(sum(c["hits"]) for c in caches)
    misses = sum(sum(c["misses"]) for c in caches)
    prefetched = sum(c["prefetched"] for c in caches)
    prefetch_used = sum(c["prefetch_used"] for c in caches)
    return {"cache_hits": hits, "cache_misses": misses, "cache_hit_rate": _ratio(hits, hits + misses),
            "bytes_loaded": sum(c["bytes_loaded"] for c in caches),
            "prefetched": prefetched, "prefetch_used": prefetch_used,
            "prefetch_accuracy": _ratio(prefetch_used, prefetched)}


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


def expert_stats(observer: RoutingObserver, parallel: dict[str, Any] | None = None,
                 rank_caches: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The statistics /v1/stats/experts answers; `parallel`: the tensor/expert-parallel engine's own (its size and
    the bytes its collectives moved), to which the tokens per rank are added under expert parallelism;
    `rank_caches`: each rank's `layers` of cache statistics (expert parallelism with offloading), else this
    process's caches are read."""
    per_layer = (list(map(merge_caches, zip(*(rank["layers"] for rank in rank_caches)))) if rank_caches
                 else layer_caches(observer.blocks))
    layers = []
    for index, moe, tokens, cache in zip(observer.layer_indices, observer.blocks, observer.tokens.tolist(),
                                         per_layer):
        tokens = tokens[:moe.num_experts]
        layers.append({"layer": index, "num_experts": moe.num_experts, "top_k": moe.top_k, "tokens": tokens,
                       "load_imbalance": load_imbalance(tokens), "cache": cache})
    totals = {"tokens_routed": sum(sum(layer["tokens"]) for layer in layers), **cache_totals(per_layer)}
    if parallel is not None:
        parallel = {**parallel, "expert_parallel": expert_parallel_stats(observer, parallel["expert_parallel_size"])}
        if rank_caches:
            parallel["ranks"] = [{"rank": rank, **cache_totals(caches["layers"]), "store_experts": caches["held"]}
                                 for rank, caches in enumerate(rank_caches)]
    return {"object": "expert_stats", "offloading": any(c is not None for c in per_layer), "layers": layers,
            "totals": totals, "parallel": parallel}

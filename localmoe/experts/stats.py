"""Expert statistics: what every MoE layer's experts did since the model loaded.

Per layer and expert: tokens routed, and with offloading the cache's hits, misses, bytes moved and prefetch
accuracy; per layer the load imbalance, max over mean tokens per expert (1.0 is perfectly even). Read by
/v1/stats/experts, the Prometheus collector and the dashboard, from the counters the layers keep anyway.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from localmoe.experts.cache import ExpertCache
from localmoe.layers.moe import SparseMoE

_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


def moe_layers(model: nn.Module) -> list[tuple[int, SparseMoE]]:
    """(decoder layer index, its MoE block), in depth order."""
    return [(int(_LAYER_INDEX.search(path + ".")[1]), module) for path, module in model.named_modules()
            if isinstance(module, SparseMoE)]


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
        "capacity": cache.capacity, "policy": cache.policy,
        "hits": hits, "misses": misses, "hit_rate": stats.hit_rate,
        "bytes_loaded_per_expert": stats.loaded_bytes.tolist(),
        "prefetched_per_expert": stats.prefetches.tolist(), "prefetch_used_per_expert": stats.prefetch_hits.tolist(),
        "bytes_loaded": stats.bytes_loaded,
        "resident_experts": sorted(cache.expert_slot), "resident_bytes": cache.resident_bytes,
        "budget_bytes": cache.budget_bytes,
        "prefetched": stats.prefetched, "prefetch_used": stats.prefetch_used,
        "prefetch_accuracy": _ratio(stats.prefetch_used, stats.prefetched),
    }


def expert_stats(model: nn.Module) -> dict[str, Any]:
    layers = []
    for index, moe in moe_layers(model):
        tokens = moe.tokens_per_expert.tolist()
        layers.append({"layer": index, "num_experts": moe.num_experts, "top_k": moe.top_k, "tokens": tokens,
                       "load_imbalance": load_imbalance(tokens),
                       "cache": cache_stats(moe.cache) if moe.cache is not None else None})
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
    return {"object": "expert_stats", "offloading": bool(caches), "layers": layers, "totals": totals}

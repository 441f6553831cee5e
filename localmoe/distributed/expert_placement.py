"""Which rank holds each routed expert under expert parallelism (`expert_placement`).

Shapes: L MoE layers, E experts per layer, N ranks.

- contiguous: rank r holds experts [r E/N, (r+1) E/N) of every layer (vLLM's default);
- round-robin: expert e on rank e mod N;
- balanced: the EPLB idea (DeepSeek's expert-parallel load balancer, without its replicas): per layer, experts
  in falling order of the tokens a routing trace or statistics file says they took, each to the rank that has
  taken the fewest tokens so far among those with room. Every rank keeps E/N experts (the same memory on each);
  only which ones changes.

A rank's load in a layer is the tokens routed to the experts it holds; the layer waits for its busiest rank, so
the imbalance of a layer is max over mean of those loads (1.0: even), and of a model the mean over its layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from localmoe.experts.trace import read_trace

PLACEMENTS = ("contiguous", "round-robin", "balanced")


def place_experts(policy: str, num_experts: int, world: int, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """The rank of each expert [E] of one layer; `tokens` [E] (balanced only): each expert's load."""
    if world > num_experts:
        raise ValueError(f"expert parallelism over {world} ranks needs at least as many experts per layer "
                         f"(the model has {num_experts})")
    experts = torch.arange(num_experts)
    if policy == "contiguous":
        return experts * world // num_experts
    if policy == "round-robin":
        return experts % world
    if policy != "balanced":
        raise ValueError(f"expert_placement {policy!r} is not one of {', '.join(PLACEMENTS)}")
    if tokens is None:
        raise ValueError("balanced expert placement needs each expert's tokens (expert_placement_stats)")
    room = [num_experts // world + (r < num_experts % world) for r in range(world)]
    load = [0] * world
    owner = torch.empty(num_experts, dtype=torch.long)
    for expert in torch.argsort(tokens, descending=True, stable=True).tolist():
        rank = min((r for r in range(world) if room[r]), key=lambda r: (load[r], r))
        owner[expert] = rank
        room[rank] -= 1
        load[rank] += int(tokens[expert])
    return owner


def model_placement(policy: str, num_experts: int, num_layers: int, world: int,
                    tokens: torch.Tensor | None = None) -> torch.Tensor:
    """The rank of each expert of each MoE layer [L, E]; `tokens` [L, E] for balanced placement."""
    if tokens is not None:
        if tokens.shape[0] != num_layers or tokens.shape[1] > num_experts:
            raise ValueError(f"the routing statistics count {tokens.shape[1]} experts in {tokens.shape[0]} MoE "
                             f"layers; the model has {num_experts} in {num_layers}")
        tokens = torch.cat([tokens, tokens.new_zeros(num_layers, num_experts - tokens.shape[1])], dim=1)
    return torch.stack([place_experts(policy, num_experts, world, None if tokens is None else tokens[layer])
                        for layer in range(num_layers)])


def rank_tokens(tokens: torch.Tensor, owner: torch.Tensor, world: int) -> torch.Tensor:
    """Tokens each rank's experts took [L, N], from tokens per expert [L, E] and their ranks [L, E]."""
    return torch.zeros(tokens.shape[0], world, dtype=torch.long).scatter_add_(1, owner, tokens.long())


def rank_imbalance(per_rank: torch.Tensor) -> float:
    """Mean over layers of max / mean tokens per rank ([L, N]); 0.0 before any token was routed."""
    totals = per_rank.sum(dim=1)
    routed = totals > 0
    if not routed.any():
        return 0.0
    ratios = per_rank[routed].max(dim=1).values * per_rank.shape[1] / totals[routed]
    return float(ratios.double().mean())


def load_routing_counts(path: str | Path) -> torch.Tensor:
    """Tokens per (MoE layer, expert) [L, E'] from an expert statistics file (the JSON /v1/stats/experts answers:
    its layers' `tokens`) or a routing trace (JSON lines, experts/trace.py; E' is then one past the highest expert
    it saw)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:  # a trace of several lines
            whole = None
        if isinstance(whole, dict) and "layers" in whole:
            counts = torch.tensor([layer["tokens"] for layer in whole["layers"]], dtype=torch.long)
        else:
            counts = _trace_counts(path)
        if counts.dim() != 2 or counts.numel() == 0:
            raise ValueError("no MoE layer's counts in it")
        return counts
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        raise ValueError(f"expert_placement_stats: cannot read routing counts from {path}: {error}") from None


def _trace_counts(path: str | Path) -> torch.Tensor:
    records = [torch.tensor(record["experts"], dtype=torch.long).flatten(1) for record in read_trace(path)]
    if not records:
        raise ValueError("no routing records in it")
    ids = torch.cat(records, dim=1)  # [L, pairs]
    num_experts = int(ids.max()) + 1
    return torch.stack([torch.bincount(layer[layer >= 0], minlength=num_experts) for layer in ids])

"""Routers: pure functions from router logits [T, E] (or token ids) to (weights [T, K] float32, expert ids [T, K]).

Each family's choice rule lives here under its own name; SparseMoE.route applies the one its model uses.
The built-in architecture (models/localmoe.py) adds hash routing, expert choice and capacity limits, and soft
MoE's dispatch and combine weights. Those that compare tokens do it within each sequence's tokens of the step
(layers/segments.py). An expert id of -1 marks a pair that routes nowhere (its weight is 0): expert choice gives
tokens different numbers of experts, and a capacity limit drops pairs.
"""

from __future__ import annotations

from typing import Callable

import torch

from localmoe.layers.segments import Segments


def softmax_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts, keep the k best (Mixtral, Qwen, OLMoE). Renormalised over the k kept, that is the
    softmax of the k best logits (Mixtral's Softmax(TopK(x W_g)); gpt-oss's router too, its bias being part of
    the logits)."""
    if renormalize:
        best, expert_ids = torch.topk(router_logits, top_k, dim=-1)
        return torch.softmax(best, dim=-1, dtype=torch.float32), expert_ids
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    return torch.topk(probs, top_k, dim=-1)


def _keep_best_groups(scores: torch.Tensor, num_groups: int, topk_group: int,
                      group_score: Callable[[torch.Tensor], torch.Tensor], fill: float) -> torch.Tensor:
    """Experts come in `num_groups` equal groups (DeepSeek: one group per device); only the `topk_group` groups
    with the best `group_score` stay candidates, the others' scores become `fill`. scores [T, E]."""
    if topk_group >= num_groups:
        return scores
    grouped = scores.view(scores.shape[0], num_groups, -1)  # [T, G, E/G]
    best = torch.topk(group_score(grouped), topk_group, dim=-1).indices
    keep = torch.zeros(grouped.shape[:2], dtype=torch.bool, device=scores.device).scatter_(1, best, True)
    return grouped.masked_fill(~keep.unsqueeze(-1), fill).view_as(scores)


def group_limited_softmax_topk(router_logits: torch.Tensor, top_k: int, num_groups: int, topk_group: int,
                               scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2: softmax over experts, the k best within the groups holding the best single scores (greedy:
    one group), their probabilities not renormalised but scaled by `routed_scaling_factor`."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    probs = _keep_best_groups(probs, num_groups, topk_group, lambda g: g.amax(dim=-1), 0.0)
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)
    return weights * scaling, expert_ids


def biased_sigmoid_group_topk(router_logits: torch.Tensor, correction_bias: torch.Tensor, top_k: int,
                              num_groups: int, topk_group: int, renormalize: bool,
                              scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's auxiliary-loss-free balancing: sigmoid scores plus a per-expert correction bias choose the
    experts (groups ranked by the sum of their two best biased scores), the unbiased scores weigh them, optionally
    renormalised over the k chosen, then scaled by `routed_scaling_factor`."""
    scores = torch.sigmoid(router_logits.float())
    biased = _keep_best_groups(scores + correction_bias, num_groups, topk_group,
                               lambda g: g.topk(2, dim=-1).values.sum(dim=-1), float("-inf"))
    expert_ids = torch.topk(biased, top_k, dim=-1).indices
    weights = scores.gather(1, expert_ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, expert_ids


def hash_topk(token_ids: torch.Tensor, num_experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hash layers (Roller et al. 2021): no learned router, a fixed hash of the token id picks the expert, here
    the high bits of Knuth's multiplicative hash; experts 2..k are the ones after it (mod E), so the k are
    distinct, and they weigh equally."""
    first = (token_ids.long() * 2654435761 % 2**32 * num_experts) >> 32
    expert_ids = (first[:, None] + torch.arange(top_k, device=token_ids.device)) % num_experts
    return torch.full(expert_ids.shape, 1.0 / top_k, device=token_ids.device), expert_ids


def expert_capacity(num_tokens: torch.Tensor, top_k: int, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """Tokens an expert may take: ceil(capacity_factor * tokens * k / E), at least one (per sequence [B])."""
    return torch.ceil(num_tokens.double() * (capacity_factor * top_k / num_experts)).long().clamp(min=1)


def expert_choice(router_logits: torch.Tensor, segments: Segments, top_k: int,
                  capacity_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert choice (Zhou et al. 2022): scores are the softmax over experts, and each expert picks the
    `expert_capacity` tokens of a sequence it scores highest, so every expert gets the same number of tokens (k
    per token on average). A token's output sums the experts that picked it, weighted by its scores; some get
    more than k experts, some none. As token-choice pairs [T, K'], K' the most experts any token got."""
    scores = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
    num_experts = scores.shape[1]
    capacity = expert_capacity(segments.lengths, top_k, num_experts, capacity_factor).minimum(segments.lengths)
    padded = segments.pad(scores, -1.0)  # [B, L, E]; padding ranks below every token
    best = padded.topk(int(capacity.max()), dim=1).indices  # [B, C, E]: each expert's tokens, best first
    within = torch.arange(best.shape[1], device=best.device)[None, :, None] < capacity[:, None, None]
    picked = torch.zeros_like(padded, dtype=torch.bool).scatter_(1, best, within.expand_as(best))
    picked = segments.unpad(picked)  # [T, E]
    width = max(int(picked.sum(dim=1).max()), 1)
    expert_ids = torch.where(picked, torch.arange(num_experts, device=picked.device), -1).topk(width, dim=1).values
    return scores.gather(1, expert_ids.clamp(min=0)).masked_fill(expert_ids < 0, 0), expert_ids


def drop_over_capacity(weights: torch.Tensor, expert_ids: torch.Tensor, segments: Segments, num_experts: int,
                       capacity_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch Transformer / GShard capacity: each expert takes at most `expert_capacity` of a sequence's
    (token, expert) pairs, the first in token order; the rest are dropped (id -1, weight 0), so a token every
    expert dropped passes through on the residual alone."""
    num_tokens, top_k = expert_ids.shape
    capacity = expert_capacity(segments.lengths, top_k, num_experts, capacity_factor)
    group = (segments.seq[:, None] * num_experts + expert_ids).flatten()  # (sequence, expert) of each pair
    order = torch.argsort(group, stable=True)  # pairs grouped, token order kept within a group
    sizes = torch.bincount(group, minlength=capacity.shape[0] * num_experts)
    starts = torch.cumsum(sizes, 0) - sizes  # where each group begins in `order`
    rank = torch.empty_like(group)  # the pair's place in its group's queue
    rank[order] = torch.arange(group.shape[0], device=group.device) - starts[group[order]]
    dropped = rank.view(num_tokens, top_k) >= capacity[segments.seq, None]
    return weights.masked_fill(dropped, 0), expert_ids.masked_fill(dropped, -1)


def soft_moe_weights(slot_logits: torch.Tensor, segments: Segments) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft MoE (Puigcerver et al. 2023) from the logits X·Phi [T, E*S] (S slots per expert, each expert's
    together): dispatch weights [B, E*S, L], per slot a softmax over its sequence's tokens (padding weighs 0),
    make each slot's input a convex combination of the tokens; combine weights [T, E*S], per token a softmax over
    the slots, make its output a convex combination of the slots' outputs."""
    dispatch = torch.softmax(segments.pad(slot_logits.float(), float("-inf")), dim=1).transpose(1, 2)
    return dispatch, torch.softmax(slot_logits, dim=-1, dtype=torch.float32)

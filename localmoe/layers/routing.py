"""Token-choice routers: pure functions from router logits [T, E] to (weights [T, K] float32, expert ids [T, K]).

Each family's choice rule lives here under its own name; SparseMoE.route applies the one its model uses.
"""

from __future__ import annotations

from typing import Callable

import torch


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

"""Token-choice routers: pure functions from router logits [T, E] to (weights [T, K] float32, expert ids [T, K]).

Each family's choice rule lives here under its own name; SparseMoE.route applies the one its model uses.
"""

from __future__ import annotations

import torch


def softmax_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts, keep the k best (Mixtral, Qwen, OLMoE). Renormalised over the k kept, that is the
    softmax of the k best logits (Mixtral's Softmax(TopK(x W_g)))."""
    if renormalize:
        best, expert_ids = torch.topk(router_logits, top_k, dim=-1)
        return torch.softmax(best, dim=-1, dtype=torch.float32), expert_ids
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    return torch.topk(probs, top_k, dim=-1)

"""The sparse MoE feed-forward block: a router picks k experts per token, only those experts run.

Shapes: T tokens, D hidden, I expert intermediate, E experts, K experts per token.
Experts are stacked parameters (w1, w3: [E, I, D]; w2: [E, D, I]) so routing is an index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def softmax_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-choice routing (Mixtral, Qwen, OLMoE): softmax over experts, keep the k best."""
    probs = F.softmax(router_logits.float(), dim=-1)
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, expert_ids


class SparseMoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool = True) -> None:
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.w3 = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        # tokens routed to each expert since load; read by the expert statistics
        self.tokens_per_expert = torch.zeros(num_experts, dtype=torch.long, device="cpu")
        self.record_routing = False  # keep the last step's choices for a routing trace
        self.last_expert_ids: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = softmax_topk(self.gate(x), self.top_k, self.renormalize)
        if self.record_routing:
            self.last_expert_ids = expert_ids
        return self.run_experts(x, weights.to(x.dtype), expert_ids)

    def run_experts(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Group the T*K (token, expert) pairs by expert and run each active expert once."""
        flat_ids = expert_ids.flatten()
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.w1.shape[0]).cpu()
        self.tokens_per_expert += counts
        flat_weights = weights.flatten()
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            pairs = order[start:start + count]
            start += count
            tokens = pairs // self.top_k
            xe = x[tokens]
            h = F.silu(xe @ self.w1[expert].T) * (xe @ self.w3[expert].T)
            out.index_add_(0, tokens, (h @ self.w2[expert].T) * flat_weights[pairs, None])
        return out

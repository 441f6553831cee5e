"""The sparse MoE feed-forward block: a router picks k experts per token, only those experts run.

Shapes: T tokens, D hidden, I expert intermediate, E experts, K experts per token.
Experts are stacked parameters (w13: [E, 2I, D], the gate projection w1 over the up projection w3;
w2: [E, D, I]) so routing is an index and each expert's SwiGLU input side is one matmul.
A shared expert (Qwen-MoE, DeepSeek) sees every token and is added to the routed experts' mix, scaled
by a sigmoid gate where the family has one (Qwen-MoE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.layers.fused_moe import fused_moe
from localmoe.layers.fused_moe import kernel as fused_kernel
from localmoe.layers.linear import Linear, linear, pack_weight
from localmoe.layers.routing import softmax_topk

# Up to this many tokens a step (decodes, short chunks) the CPU kernel beats oneDNN: it is bound by
# reading the weights, oneDNN by its per-call costs; past it, oneDNN's blocked matmuls compute faster.
FUSED_MAX_TOKENS = 32


class SparseMoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool = True, shared_expert: nn.Module | None = None,
                 shared_expert_gate: bool = False) -> None:
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.num_experts = num_experts
        self.gate = Linear(hidden_size, num_experts, bias=False)
        self.shared_expert = shared_expert
        self.shared_expert_gate = Linear(hidden_size, 1, bias=False) if shared_expert_gate else None
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        # tokens routed to each expert since load; read by the expert statistics
        self.tokens_per_expert = torch.zeros(num_experts, dtype=torch.long, device="cpu")
        self.record_routing = False  # keep the last step's choices for a routing trace
        self.last_expert_ids: torch.Tensor | None = None
        self.packed: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per expert (w13, w2), see pack()
        self.fused_calls = 0  # steps served by the CPU kernel (layers/fused_moe.py)

    def expert_weights(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.packed[expert] if self.packed is not None else (self.w13[expert], self.w2[expert])

    def uses_kernel(self) -> bool:
        """bf16 on a CPU where our kernel builds: experts stay row-major for it (it reads rows itself)."""
        return self.w13.device.type == "cpu" and self.w13.dtype == torch.bfloat16 and fused_kernel() is not None

    def pack(self) -> None:
        """Each expert's weights in the packed CPU layout (layers/linear.py); the stacked copies are freed."""
        if self.uses_kernel():
            return
        self.packed = [(pack_weight(self.w13[e]), pack_weight(self.w2[e])) for e in range(self.num_experts)]
        self.w13.data = self.w13.data.new_empty(0)
        self.w2.data = self.w2.data.new_empty(0)

    def count_routed(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """Tokens this step routed to each expert [E] (on CPU), added to the running statistics."""
        counts = torch.bincount(expert_ids.flatten(), minlength=self.num_experts).cpu()
        self.tokens_per_expert += counts
        return counts

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights [T, K] (float32) and expert ids [T, K]; families with other routers override this."""
        return softmax_topk(self.gate(x), self.top_k, self.renormalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = self.route(x)
        if self.record_routing:
            self.last_expert_ids = expert_ids
        if x.shape[0] <= FUSED_MAX_TOKENS and self.uses_kernel():
            self.fused_calls += 1
            self.count_routed(expert_ids)
            out = fused_moe(x, expert_ids, weights, self.w13, self.w2)
        else:
            out = self.run_experts(x, weights.to(x.dtype), expert_ids)
        if self.shared_expert is None:
            return out
        shared = self.shared_expert(x)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return out + shared

    def run_experts(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Group the T*K (token, expert) pairs by expert and run each active expert once over its tokens
        (the SwiGLU activation runs once over all pairs in between), then put the pair outputs back in
        (token, k) order and mix them with the routing weights."""
        num_tokens, top_k = expert_ids.shape
        flat_ids = expert_ids.flatten()
        order = torch.argsort(flat_ids, stable=True)
        counts = self.count_routed(expert_ids)
        xs = x[order // top_k]  # the token of each pair, grouped by expert
        groups, start = [], 0  # (expert, its rows of xs)
        for expert, count in enumerate(counts.tolist()):
            if count:
                groups.append((expert, slice(start, start + count)))
                start += count
        gate, up = torch.cat([linear(xs[rows], self.expert_weights(e)[0]) for e, rows in groups]).chunk(2, dim=-1)
        hidden = F.silu(gate) * up
        pair_out = torch.empty_like(xs)
        pair_out[order] = torch.cat([linear(hidden[rows], self.expert_weights(e)[1]) for e, rows in groups])
        # each token's k outputs mixed by its routing weights: [T, 1, K] @ [T, K, D]
        return torch.bmm(weights.view(num_tokens, 1, top_k), pair_out.view(num_tokens, top_k, -1)).view_as(x)

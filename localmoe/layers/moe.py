"""The sparse MoE feed-forward block: a router picks k experts per token, only those experts run.

Shapes: T tokens, D hidden, I expert intermediate, E experts, K experts per token.
Experts are stacked parameters (w13: [E, 2I, D], the gate projection w1 over the up projection w3;
w2: [E, D, I]) so routing is an index and each expert's SwiGLU input side is one matmul.
A shared expert (Qwen-MoE, DeepSeek) sees every token and is added to the routed experts' mix, scaled
by a sigmoid gate where the family has one (Qwen-MoE). Some families (gpt-oss) add biases to the router and
the experts, and use another gated activation in place of SwiGLU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.experts.store import ExpertStore
from localmoe.layers.cpu_kernels import expert_tiles, fused_moe, kernels
from localmoe.layers.huge_pages import on_huge_pages
from localmoe.layers.linear import Linear, linear, pack_weight
from localmoe.layers.routing import softmax_topk

if TYPE_CHECKING:
    from localmoe.experts.cache import ExpertCache

Activation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (gate, up) halves -> expert hidden [.., I]


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU (Shazeer 2020), the experts' activation in most families."""
    return F.silu(gate) * up


class SparseMoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool = True, shared_expert: nn.Module | None = None,
                 shared_expert_gate: bool = False, router_bias: bool = False, expert_bias: bool = False,
                 activation: Activation = swiglu) -> None:
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.num_experts = num_experts
        self.activation = activation
        self.gate = Linear(hidden_size, num_experts, bias=router_bias)
        self.shared_expert = shared_expert
        self.shared_expert_gate = Linear(hidden_size, 1, bias=False) if shared_expert_gate else None
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.w13_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size)) if expert_bias else None
        self.w2_bias = nn.Parameter(torch.empty(num_experts, hidden_size)) if expert_bias else None
        # tokens routed to each expert since load; read by the expert statistics
        self.tokens_per_expert = torch.zeros(num_experts, dtype=torch.long, device="cpu")
        self.record_routing = False  # keep the last step's choices for a routing trace
        self.last_expert_ids: torch.Tensor | None = None
        self.packed: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per expert (w13, w2), see pack()
        self.tiled = False  # experts are in the CPU kernel's tiles (see pack)
        self.fused_calls = 0  # steps served by the CPU kernel (layers/cpu_kernels.py)
        self.cache: ExpertCache | None = None  # offloaded experts (experts/cache.py): w13/w2 are its slots
        self.prefetch_next: Callable[[torch.Tensor], None] | None = None  # see attach_cache

    def expert(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(w13, w2, w13 bias, w2 bias) of expert `index`, or of cache slot `index` when experts are offloaded
        (w13 and w2 are then the cache's slots; the biases stay resident, indexed by expert)."""
        w13, w2 = self.packed[index] if self.packed is not None else (self.w13[index], self.w2[index])
        if self.w13_bias is None:
            return w13, w2, None, None
        expert = self.cache.slot_expert[index] if self.cache is not None else index
        return w13, w2, self.w13_bias[expert], self.w2_bias[expert]

    def offload(self, path: str, store: ExpertStore) -> None:
        """Hand the stacked experts to `store` (the loader fills them there): the parameters keep only their
        shape, on the meta device, until a cache is attached."""
        store.add_layer(path, self.num_experts, {"w13": tuple(self.w13.shape[1:]), "w2": tuple(self.w2.shape[1:])})
        self.w13 = nn.Parameter(torch.empty(self.w13.shape, device="meta"), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(self.w2.shape, device="meta"), requires_grad=False)

    def attach_cache(self, cache: ExpertCache, prefetch_for: "SparseMoE | None" = None) -> None:
        """Serve experts from `cache` slots; with `prefetch_for` (the next MoE layer), guess that layer's experts
        by applying its router to this layer's input, and have them loaded while this layer computes."""
        self.cache = cache
        self.prefetch_next = None
        if prefetch_for is not None:  # a function, not a module attribute: the next layer is no submodule
            def prefetch(x: torch.Tensor) -> None:
                prefetch_for.cache.prefetch(torch.unique(prefetch_for.route(x)[1]).tolist())
            self.prefetch_next = prefetch
        self.w13, self.w2 = nn.Parameter(cache.slots["w13"], False), nn.Parameter(cache.slots["w2"], False)

    def uses_kernel(self) -> bool:
        """bf16 on a CPU where our kernel builds, for plain SwiGLU experts without biases (all the kernel
        computes), in sizes that fit its tiles."""
        return (self.activation is swiglu and self.w13_bias is None and self.w13.device.type == "cpu"
                and self.w13.dtype == torch.bfloat16 and self.w13.shape[-1] % 16 == 0
                and self.w2.shape[-1] % 16 == 0 and kernels() is not None)

    def pack(self) -> None:
        """Experts in the layout their matmuls read best: the kernel's tiles (layers/cpu_kernels.py), in place,
        or, where the kernel does not serve, oneDNN's blocked layout per expert (layers/linear.py). Offloaded
        experts have the store lay each one out as it comes in (the cache slots are still empty)."""
        if self.uses_kernel():
            self.tiled = True
            if self.cache is not None:
                self.cache.store.set_layout(self.cache.path, expert_tiles)
            else:
                self.w13.data, self.w2.data = map(on_huge_pages, expert_tiles(self.w13.data, self.w2.data))
        elif self.cache is None:
            self.packed = [(pack_weight(self.w13[e]), pack_weight(self.w2[e])) for e in range(self.num_experts)]
            self.w13.data = self.w13.data.new_empty(0)
            self.w2.data = self.w2.data.new_empty(0)

    def count_routed(self, expert_ids: torch.Tensor) -> None:
        """Add the tokens this step routed to each expert to the running statistics (pairs routed nowhere, -1,
        left out)."""
        # shifted by one, pairs routed nowhere count in bin 0 and are dropped: no masking (a data-dependent shape)
        self.tokens_per_expert += torch.bincount(expert_ids.flatten() + 1, minlength=self.num_experts + 1)[1:].cpu()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights [T, K] (float32) and expert ids [T, K]; families with other routers override this."""
        return softmax_topk(self.gate(x), self.top_k, self.renormalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dispatch(x, *self.route(x))

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """The block's output once routed: each token's experts mixed by its weights [T, K] (plus the shared
        expert); an expert id of -1 adds nothing."""
        if self.record_routing:
            self.last_expert_ids = expert_ids
        if self.prefetch_next is not None:
            self.prefetch_next(x)
        if self.cache is None:
            out = self.run_experts(x, weights, expert_ids, count=True)
        else:
            self.count_routed(expert_ids)
            out = self.run_waves(x, weights, expert_ids)
        if self.shared_expert is None:
            return out
        shared = self.shared_expert(x)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return out + shared

    def run_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                    count: bool = False) -> torch.Tensor:
        """sum_k weights[t, k] * expert ids[t, k] (x[t]); -1 leaves a pair out. Tiled experts go to our CPU
        kernel; otherwise the pairs are grouped by expert (pair_outputs) and mixed by the weights. With `count`,
        the pairs are added to the routing statistics (by the kernel as it groups them: no ops of their own)."""
        if self.tiled:
            self.fused_calls += 1
            return fused_moe(x, ids, weights, self.w13, self.w2, counts=self.tokens_per_expert if count else None)
        if count:
            self.count_routed(ids)
        return self.mix(weights, self.pair_outputs(x, ids))

    def run_waves(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """run_experts over offloaded experts, wave by wave of the cache (experts/cache.py), with slot ids in place
        of expert ids. Partial results stay exact until the end (pair outputs, or the kernel's float32 sums) and
        are rounded once, so the output is the resident one (exactly, for top-2)."""
        if self.tiled:
            self.fused_calls += 1
            total = sum(fused_moe(x, slots, weights, self.w13, self.w2, float_out=True)
                        for slots in self.cache.waves(ids))
            return total.to(x.dtype)
        return self.mix(weights, sum(self.pair_outputs(x, slots) for slots in self.cache.waves(ids)))

    def pair_outputs(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Each (token, k) pair's expert output [T * K, D], zero where the id is -1. The pairs are grouped by expert,
        each active expert runs once over its tokens, the activation once over all pairs in between."""
        num_tokens, top_k = ids.shape
        flat_ids = ids.flatten()
        counts = torch.bincount(flat_ids + 1, minlength=self.w13.shape[0] + 1).tolist()
        order = torch.argsort(flat_ids, stable=True)[counts[0]:]  # pairs left out (-1) sort first
        xs = x[order // top_k]  # the token of each pair, grouped by expert
        groups, start = [], 0  # (expert, its rows of xs)
        for index, count in enumerate(counts[1:]):
            if count:
                groups.append((self.expert(index), slice(start, start + count)))
                start += count
        pair_out = x.new_zeros(num_tokens * top_k, x.shape[1]) if counts[0] else torch.empty_like(xs)
        if groups:
            gate_up = torch.cat([linear(xs[rows], w13, b13) for (w13, _, b13, _), rows in groups])
            hidden = self.activation(*gate_up.chunk(2, dim=-1))
            pair_out[order] = torch.cat([linear(hidden[rows], w2, b2) for (_, w2, _, b2), rows in groups])
        return pair_out

    def mix(self, weights: torch.Tensor, pair_out: torch.Tensor) -> torch.Tensor:
        """Each token's k pair outputs mixed by its routing weights: [T, 1, K] @ [T, K, D] -> [T, D]."""
        num_tokens, top_k = weights.shape
        mixed = torch.bmm(weights.to(pair_out.dtype).view(num_tokens, 1, top_k), pair_out.view(num_tokens, top_k, -1))
        return mixed.view(num_tokens, -1)

"""The sparse MoE feed-forward block: a router picks k experts per token, only those experts run.

Shapes: T tokens, D hidden, I expert intermediate, E experts, K experts per token.

The block is a router plus an experts module (gpt-fast's MOEFeedForward / ConditionalFeedForward split). The
router (`SparseMoE.route`) turns each token into K (weight, expert id) pairs; the experts module turns
(x, weights, expert ids) into the mixed output. `GroupedExperts` here is the plain PyTorch one the model files
build and the loader fills. How experts are stored and run while serving (the CPU kernel's tiles, oneDNN's
layout, a cache of offloaded experts) is decided after loading by one pass over the model (experts/runtime.py),
which swaps in another `Experts`; the model files know none of it.

GroupedExperts stacks its experts (w13: [E, 2I, D], the gate projection w1 over the up projection w3;
w2: [E, D, I]) so routing is an index and each expert's SwiGLU input side is one matmul. A shared expert
(Qwen-MoE, DeepSeek) sees every token and is added to the routed experts' mix, scaled by a sigmoid gate where
the family has one (Qwen-MoE). Some families (gpt-oss) add biases to the router and the experts, and use another
gated activation in place of SwiGLU.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.layers.linear import Linear, linear
from localmoe.layers.routing import softmax_topk

Activation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (gate, up) halves -> expert hidden [.., I]
# (weight "w13" or "w2", the pairs' inputs grouped by expert, (expert, its rows) spans, each pair's token) -> an
# addition to that projection's outputs, or None
PairDelta = Callable[[str, torch.Tensor, list[tuple[int, slice]], torch.Tensor], torch.Tensor | None]
ExpertWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]  # w13, w2, biases


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU (Shazeer 2020), the experts' activation in most families."""
    return F.silu(gate) * up


class Experts(nn.Module):
    """E experts applied to routed tokens: forward(x [T, D], weights [T, K] float32, ids [T, K]) -> [T, D], each
    token's experts mixed by its weights; an id of -1 adds nothing.

    `partial` and `combine` split forward for callers that run the experts in parts (offloaded experts, a wave
    of resident ones at a time): partial results add up exactly, and combine rounds their sum once, so any split
    gives what one call gives."""

    num_experts: int

    def partial(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def combine(self, weights: torch.Tensor, total: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.combine(weights, self.partial(x, weights, ids), x.dtype)


class GroupedPathExperts(Experts):
    """Experts run by the grouped path (pair_outputs): the pairs are grouped by expert, each active expert runs
    once over its tokens, the activation once over all pairs in between. Partial results are the pairs' outputs
    (exact: each pair is computed once, zero elsewhere), mixed by the routing weights in combine. Subclasses keep
    the weights (`weights_of(index)` gives expert index's w13 and w2); `activation`, `w13_bias` and `w2_bias` are
    the experts' own."""

    activation: Activation
    w13_bias: torch.Tensor | None
    w2_bias: torch.Tensor | None

    def weights_of(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def expert(self, index: int) -> ExpertWeights:
        """(w13, w2, w13 bias, w2 bias) of expert `index`."""
        w13, w2 = self.weights_of(index)
        if self.w13_bias is None:
            return w13, w2, None, None
        return w13, w2, self.w13_bias[index], self.w2_bias[index]

    def partial(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return pair_outputs(x, ids, self.num_experts, self.expert, self.activation)

    def combine(self, weights: torch.Tensor, total: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return mix(weights, total)


class GroupedExperts(GroupedPathExperts):
    """The plain PyTorch experts, stacked (what the model files build and the loader fills)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, bias: bool = False,
                 activation: Activation = swiglu) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.activation = activation
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.w13_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size)) if bias else None
        self.w2_bias = nn.Parameter(torch.empty(num_experts, hidden_size)) if bias else None

    def weights_of(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w13[index], self.w2[index]


def pair_outputs(x: torch.Tensor, ids: torch.Tensor, num_experts: int, expert: Callable[[int], ExpertWeights],
                 activation: Activation, delta: PairDelta | None = None) -> torch.Tensor:
    """Each (token, k) pair's expert output [T * K, D], zero where the id is -1; `expert(i)` gives expert i's
    weights. The pairs are grouped by expert, each active expert runs once over its tokens, the activation once
    over all pairs in between. `delta` adds to each projection's output what a caller adds per pair (LoRA's
    updates, lora/layers.py)."""
    num_tokens, top_k = ids.shape
    flat_ids = ids.flatten()
    counts = torch.bincount(flat_ids + 1, minlength=num_experts + 1).tolist()
    order = torch.argsort(flat_ids, stable=True)[counts[0]:]  # pairs left out (-1) sort first
    xs = x[order // top_k]  # the token of each pair, grouped by expert
    groups, spans, start = [], [], 0  # (expert's weights, its rows of xs); (expert, its rows)
    for index, count in enumerate(counts[1:]):
        if count:
            groups.append((expert(index), slice(start, start + count)))
            spans.append((index, slice(start, start + count)))
            start += count
    pair_out = x.new_zeros(num_tokens * top_k, x.shape[1]) if counts[0] else torch.empty_like(xs)
    if groups:
        gate_up = torch.cat([linear(xs[rows], w13, b13) for (w13, _, b13, _), rows in groups])
        if delta is not None and (extra := delta("w13", xs, spans, order // top_k)) is not None:
            gate_up = gate_up + extra
        hidden = activation(*gate_up.chunk(2, dim=-1))
        down = torch.cat([linear(hidden[rows], w2, b2) for (_, w2, _, b2), rows in groups])
        if delta is not None and (extra := delta("w2", hidden, spans, order // top_k)) is not None:
            down = down + extra
        pair_out[order] = down
    return pair_out


def mix(weights: torch.Tensor, pair_out: torch.Tensor) -> torch.Tensor:
    """Each token's k pair outputs mixed by its routing weights: [T, 1, K] @ [T, K, D] -> [T, D]."""
    num_tokens, top_k = weights.shape
    mixed = torch.bmm(weights.to(pair_out.dtype).view(num_tokens, 1, top_k), pair_out.view(num_tokens, top_k, -1))
    return mixed.view(num_tokens, -1)


class SparseMoE(nn.Module):
    # Each token's experts come from its own router scores alone (a per-token routing trace means something).
    token_choice = True
    # route(x) is the whole router and names K real experts per token: another layer can guess this one's experts
    # from an input (prefetch), and every id is an expert to load (expert offloading).
    plain_top_k = True

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool = True, shared_expert: nn.Module | None = None,
                 shared_expert_gate: bool = False, router_bias: bool = False, expert_bias: bool = False,
                 activation: Activation = swiglu) -> None:
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.num_experts = num_experts
        self.gate = Linear(hidden_size, num_experts, bias=router_bias)
        self.experts: Experts = GroupedExperts(num_experts, hidden_size, intermediate_size, expert_bias, activation)
        self.shared_expert = shared_expert
        self.shared_expert_gate = Linear(hidden_size, 1, bias=False) if shared_expert_gate else None
        for router in (self.gate, self.shared_expert_gate):  # routing decides everything after it: never quantized
            if router is not None:
                router.keep_dense = True

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights [T, K] (float32) and expert ids [T, K]; families with other routers override this."""
        return softmax_topk(self.gate(x), self.top_k, self.renormalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dispatch(x, *self.route(x))

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """The block's output once routed: the experts' mix plus the shared expert."""
        out = self.experts(x, weights, expert_ids)
        if self.shared_expert is None:
            return out
        shared = self.shared_expert(x)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return out + shared


def moe_blocks(model: nn.Module) -> list[tuple[str, SparseMoE]]:
    """(module path, block) of every MoE block of a model, in depth order."""
    return [(path, module) for path, module in model.named_modules() if isinstance(module, SparseMoE)]

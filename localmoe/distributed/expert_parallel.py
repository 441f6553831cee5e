"""Expert parallelism applied to a loaded model from outside, after apply_tp (`--enable-expert-parallel`).

Shapes: N ranks, r this rank, T tokens, D hidden, E experts per layer, K experts per token, E_r this rank's.

As in vLLM with data_parallel_size 1, the expert-parallel group is the tensor-parallel one: attention, dense
MLPs, shared experts, embedding and head are split by apply_tp(split_experts=False); each MoE layer's routed
experts are not split by intermediate feature but kept whole, E_r of them on rank r, as the placement says
(distributed/expert_placement.py). The TP all-reduce that closes the attention block leaves every rank with all
T tokens, so every rank routes all of them itself (the router is replicated) and runs only its own experts on the
pairs routed to them; pairs routed elsewhere take id -1 here and add nothing. The MoE block's output is then a
partial sum over the ranks' experts (plus each rank's share of the shared expert), and the all-reduce TP already
runs after the block combines it: the all-gather + reduce-scatter form of dispatch and combine, which at small
batch moves T * D per rank per block, no more than TP, and needs no all-to-all with its per-peer token counts.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from localmoe.layers.moe import Experts, GroupedExperts, moe_blocks


class ExpertParallelExperts(Experts):
    """The experts of one MoE layer this rank holds (`local`, E_r of them, whichever implementation the experts
    pass then gives them), behind the layer's global expert ids: forward maps each id to its local index, -1
    where another rank holds it. `owner` [E] is every expert's rank (for the statistics per rank); `held` the
    global ids of this rank's experts, in local order. With offloading the experts' weights are not loaded (meta):
    the offloading pass then gives `local` this rank's experts from a store of its own (experts/offload.py)."""

    def __init__(self, experts: GroupedExperts, owner: torch.Tensor, rank: int, device: torch.device) -> None:
        super().__init__()
        self.num_experts = experts.num_experts
        self.owner = owner.cpu()
        mine = torch.nonzero(self.owner == rank).flatten()
        self.held: list[int] = mine.tolist()
        # global id + 1 -> local id: index 0 is id -1 (routed nowhere), which stays -1
        local_of = torch.full((self.num_experts + 1,), -1, dtype=torch.long)
        local_of[mine + 1] = torch.arange(len(mine))
        self.register_buffer("local_of", local_of.to(device), persistent=False)
        self.local: Experts = _subset(experts, mine)

    def local_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.local_of[ids + 1]

    def partial(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.local.partial(x, weights, self.local_ids(ids))

    def combine(self, weights: torch.Tensor, total: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.local.combine(weights, total, dtype)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.local(x, weights, self.local_ids(ids))


def _subset(experts: GroupedExperts, keep: torch.Tensor) -> GroupedExperts:
    """A GroupedExperts of the experts `keep` alone, in that order."""
    hidden, intermediate = experts.w2.shape[1:]
    with torch.device("meta"):  # shapes only: the kept weights replace them
        subset = GroupedExperts(len(keep), hidden, intermediate, experts.w13_bias is not None, experts.activation)
    for name in ("w13", "w2", "w13_bias", "w2_bias"):
        weight = getattr(experts, name)
        if weight is not None:
            kept = weight.detach().index_select(0, keep.to(weight.device))
            setattr(subset, name, nn.Parameter(kept, requires_grad=False))
    return subset


def apply_ep(model: nn.Module, placement: torch.Tensor, device: torch.device,
             spread: Callable[..., Experts] | None = None) -> None:
    """Keep this rank's routed experts of every MoE layer, as `placement` [L, E] (each expert's rank) says, on
    `device`; raises ValueError, naming the layer, for experts it cannot spread. `spread(experts, owner, device=)`
    makes a layer's ExpertParallelExperts (data-parallel ranks exchange their tokens in theirs:
    dp_expert_parallel.py)."""
    if spread is None:
        spread = partial(ExpertParallelExperts, rank=dist.get_rank())
    blocks = moe_blocks(model)
    if len(blocks) != placement.shape[0]:
        raise ValueError(f"the expert placement covers {placement.shape[0]} MoE layers; the model has {len(blocks)}")
    for (path, moe), owner in zip(blocks, placement):
        if not isinstance(moe.experts, GroupedExperts):
            raise ValueError(f"expert parallelism does not spread {type(moe.experts).__name__} ({path})")
        moe.experts = spread(moe.experts, owner[:moe.num_experts], device=device)

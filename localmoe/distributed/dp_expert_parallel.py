"""Expert parallelism across data-parallel ranks (`--data-parallel-size N --enable-expert-parallel`), as vLLM
combines them: attention data-parallel, experts expert-parallel.

Shapes: N ranks, r this rank, T_r its tokens this step, T = max over ranks of T_r, D hidden, K experts per token.

Each rank is a whole engine (its scheduler, KV cache, attention, dense layers, shared experts, embedding and head)
holding only its share of every MoE layer's routed experts (the placement of distributed/expert_placement.py).
The rank routes its own T_r tokens (so its routing statistics are its own requests'); the experts module then
all-gathers every rank's hidden states and routing, padded to T rows ([N T, D] and [N T, 2K]), runs its own
experts on all N T rows (pairs of experts held elsewhere, and padding rows, take id -1 and add nothing), and
reduce-scatters the [N T, D] partial sums so that each rank gets the experts' output for its own rows. A layer
moves per rank D b + 8K bytes into the all-gathers and N D b into the reduce-scatter for each of T rows.

The collectives need every rank in every step (lockstep). Before each step the ranks all-gather two numbers, the
tokens each is about to run and the requests it holds (`agree`): a rank with no tokens while another has some runs
a dummy step, each MoE layer's collectives with no rows of its own; when no rank holds a request, every engine
loop waits a moment and agrees again. A step that fails on one rank (a dead peer's broken connection, an error
in its own forward) may leave the others waiting in a collective: the rank marks the group failed and leaves
it, which fails the others' pending collectives at once, and each rank's /health then reports the failure.
A peer that hangs alive is caught by the collectives' timeout (distributed/worker.py).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from localmoe.distributed import collectives
from localmoe.distributed.expert_parallel import ExpertParallelExperts
from localmoe.distributed.worker import init_distributed
from localmoe.layers.moe import GroupedExperts, moe_blocks

log = logging.getLogger(__name__)


class LockstepError(RuntimeError):
    """The data-parallel ranks can no longer run steps together."""


class ExpertGroup:
    """This rank's place among the data-parallel ranks whose MoE layers run together, and the step they agreed."""

    def __init__(self, rank: int, size: int, init_method: str, device: torch.device) -> None:
        self.rank, self.size, self.init_method, self.device = rank, size, init_method, device
        self.tokens = [0] * size  # each rank's tokens in the step agreed last
        self.idle = False  # no rank held a request at the last agreement
        self.dummy_steps = 0
        self.failure: str | None = None

    def join(self) -> None:
        """Meet the other ranks, once this one has loaded: the wait for the slowest to load is not a collective's."""
        init_distributed(self.rank, self.size, self.init_method, self.device)

    @property
    def rows(self) -> int:
        """Rows every rank exchanges per MoE layer in this step: the most tokens any rank runs."""
        return max(self.tokens)

    @property
    def peers_compute(self) -> bool:
        return self.rows > 0

    def agree(self, tokens: int, requests: int) -> None:
        """All-gather (tokens this step, requests held) over the ranks; raises LockstepError once the group failed."""
        mine = torch.tensor([tokens, requests], dtype=torch.long, device=self.device)
        every = torch.empty(self.size * 2, dtype=torch.long, device=self.device)
        self.run(dist.all_gather_single, every, mine)
        self.tokens = every[0::2].tolist()
        self.idle = not any(every.tolist())

    def run(self, collective: Callable[..., object], *args: torch.Tensor) -> None:
        """One collective; a failure fails the group (see the module's docstring)."""
        if self.failure is not None:
            raise LockstepError(self.failure)
        try:
            collective(*args)
        except Exception as error:
            self.fail(f"a data-parallel expert-parallel collective failed: {error}")
            raise LockstepError(self.failure) from error

    def fail(self, reason: str) -> None:
        """Leave the group, saying why: the other ranks' pending and later collectives fail instead of waiting."""
        if self.failure is None:
            log.error("data-parallel rank %d leaves the expert-parallel group: %s", self.rank, reason)
        self.leave(reason)

    def leave(self, reason: str = "the engine shut down") -> None:
        """Leave the group (the engine shuts down). Idempotent."""
        if self.failure is None:
            self.failure = reason
        if dist.is_initialized():
            dist.destroy_process_group()


class DataParallelExperts(ExpertParallelExperts):
    """A MoE layer's routed experts spread over data-parallel ranks: called with this rank's tokens, it exchanges
    them with the other ranks' (see the module's docstring) and returns the experts' output for its own."""

    def __init__(self, experts: GroupedExperts, owner: torch.Tensor, group: ExpertGroup,
                 device: torch.device) -> None:
        super().__init__(experts, owner, group.rank, device)
        self.group = group
        self.hidden_size, self.dtype = experts.w2.shape[1], experts.w2.dtype  # of the rows a dummy step sends

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.exchange(x, weights, ids)

    def exchange(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        group, (own, hidden), top_k = self.group, x.shape, ids.shape[1]
        rows = group.rows
        padded = x.new_zeros(rows, hidden)
        padded[:own] = x
        # routing as float32 [T, 2K]: the weights, then the ids (exact as floats below 2^24)
        routing = torch.full((rows, 2 * top_k), -1.0, dtype=torch.float32, device=x.device)
        routing[:own, :top_k] = weights.float()
        routing[:own, top_k:] = ids.float()
        every_x = x.new_empty(group.size * rows, hidden)
        every_routing = routing.new_empty(group.size * rows, 2 * top_k)
        group.run(collectives.all_gather, every_x, padded)
        group.run(collectives.all_gather, every_routing, routing)
        every_ids = every_routing[:, top_k:].long()
        partial = super().forward(every_x, every_routing[:, :top_k].clamp(min=0).to(weights.dtype), every_ids)
        out = x.new_empty(rows, hidden)
        group.run(collectives.reduce_scatter, out, partial.contiguous())
        return out[:own]


def join_step(model: nn.Module, group: ExpertGroup, tokens: int, requests: int) -> None:
    """Agree this step with the other ranks; where this rank runs no tokens and another does, take part in that
    step: each MoE layer's collectives, in order, with no rows (a dummy step: no attention runs, so no KV is
    written, and nothing samples)."""
    group.agree(tokens, requests)
    if tokens or not group.peers_compute:
        return
    for _, moe in moe_blocks(model):
        experts: DataParallelExperts = moe.experts
        device = experts.local_of.device
        experts.exchange(torch.empty(0, experts.hidden_size, dtype=experts.dtype, device=device),
                         torch.empty(0, moe.top_k, device=device),
                         torch.empty(0, moe.top_k, dtype=torch.long, device=device))
    group.dummy_steps += 1

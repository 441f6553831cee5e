"""RoutingObserver: what the routers chose, watched from outside the MoE layers.

The engine attaches one to its model: a forward pre-hook on every MoE layer's experts module notes the expert ids
the layer hands its experts (so every routing, and every experts implementation, is observed the same way).
At the end of each step the engine calls `end_step`, which keeps the step's choices and returns them, [L, T, K], for
a routing trace; `tokens`, the tokens routed to each (layer, expert), counts what was kept with one bincount when
it is read (the statistics are published about once a second: a count per step would cost a one-stream decode step
~50-150 us). The layers themselves keep no statistics and no flags.
"""

from __future__ import annotations

import re
from functools import partial

import torch
from torch import nn

from localmoe.layers.moe import SparseMoE, moe_blocks

_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")
MAX_UNCOUNTED_STEPS = 256  # steps' routing kept before it is counted regardless


class RoutingObserver:
    def __init__(self, model: nn.Module) -> None:
        blocks = moe_blocks(model)
        self.blocks: list[SparseMoE] = [moe for _, moe in blocks]
        # the decoder layer index of each MoE block (dense layers have none), else its place among the blocks
        self.layer_indices = [int(m[1]) if (m := _LAYER_INDEX.search(path + ".")) else i
                              for i, (path, _) in enumerate(blocks)]
        self.num_experts = max((moe.num_experts for moe in self.blocks), default=0)
        self._tokens = torch.zeros(len(self.blocks), self.num_experts, dtype=torch.long)  # counted so far
        self._uncounted: list[torch.Tensor] = []  # steps' expert ids [L, N] not yet in _tokens
        self._step: list[torch.Tensor | None] = [None] * len(self.blocks)
        self._hooks = [moe.experts.register_forward_pre_hook(partial(self._note, i))
                       for i, moe in enumerate(self.blocks)]

    def _note(self, layer: int, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self._step[layer] = args[2]  # (x, weights, expert ids)

    def note_layers(self, expert_ids: torch.Tensor) -> None:
        """Every MoE layer's expert ids of the step [L, T, K], from a path that runs the layers without calling their
        experts modules (engine/fused_decoder.py)."""
        self._step = list(expert_ids)

    @property
    def tokens(self) -> torch.Tensor:
        """Tokens routed to each (layer, expert) since load [L, E] (pairs routed nowhere, -1, left out)."""
        self._count_kept()
        return self._tokens

    @torch.inference_mode()  # the kept ids are the step's inference tensors (and so may the counts be)
    def _count_kept(self) -> None:
        if self._uncounted:
            ids, self._uncounted = torch.cat(self._uncounted, dim=1), []
            self._tokens += self._count(ids)

    def end_step(self) -> torch.Tensor | None:
        """Keep the step's routing for `tokens` and return its expert ids [L, T, K] on the CPU; None unless every MoE
        layer ran, with the same shape of ids (what a trace records)."""
        step, self._step = self._step, [None] * len(self.blocks)
        if step and all(ids is not None for ids in step) and len({ids.shape for ids in step}) == 1:
            ids = torch.stack(step)
            self._uncounted.append(ids.flatten(1))
            if len(self._uncounted) >= MAX_UNCOUNTED_STEPS:
                self._count_kept()
            return ids.cpu()
        for layer, ids in enumerate(step):
            if ids is not None:
                self._tokens[layer] += self._count(ids.flatten()[None])[0]
        return None

    def _count(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [L, N] -> tokens per expert [L, E]: one bincount, each layer's ids shifted into its own range (and
        by one, so that -1 lands in a bin that is dropped)."""
        bins = self.num_experts + 1
        shifted = ids + 1 + torch.arange(ids.shape[0], device=ids.device)[:, None] * bins
        return torch.bincount(shifted.flatten(), minlength=ids.shape[0] * bins).view(-1, bins)[:, 1:].cpu()

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()

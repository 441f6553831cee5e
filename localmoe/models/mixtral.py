"""Mixtral (Jiang et al. 2024): the Llama/Mistral decoder with a sparse MoE feed-forward.

Checkpoints name experts one tensor each (`block_sparse_moe.experts.{e}.w1/w2/w3.weight`);
transformers >= 5 fuses them in memory (`mlp.experts.gate_up_proj` [E, 2I, D], `down_proj`
[E, D, I]); both load into GroupedExperts' stacked w13 (w1 rows, then w3 rows) and w2. The Qwen-MoE, OLMoE and
DeepSeek families store theirs the same way under the names gate_proj/up_proj/down_proj (map_expert_weight).
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from localmoe.layers.moe import SparseMoE
from localmoe.models.args import ModelArgs
from localmoe.models.llama import LlamaForCausalLM, Piece

_PER_EXPERT = re.compile(
    r"(layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w[123]|gate_proj|up_proj|down_proj)\.weight")
_FUSED = re.compile(r"(layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\.(gate_up_proj|down_proj)")


def map_expert_weight(name: str, tensor: torch.Tensor,
                      intermediate_size: int) -> list[tuple[str, torch.Tensor, Piece]] | None:
    """Routed-expert tensors into the MoE block's stacked `experts.w13` (gate rows w1/gate_proj, then up rows
    w3/up_proj, each `intermediate_size` rows) and `experts.w2` (w2/down_proj), stored one per expert or fused
    (`experts.gate_up_proj` [E, 2I, D], `experts.down_proj` [E, D, I]); None for any other tensor. `name` has no
    "model." prefix."""
    if m := _PER_EXPERT.fullmatch(name):
        layer, expert, projection = m[1], int(m[2]), m[3]
        if projection in ("w2", "down_proj"):
            return [(f"{layer}.mlp.experts.w2", tensor, expert)]
        start = 0 if projection in ("w1", "gate_proj") else intermediate_size
        return [(f"{layer}.mlp.experts.w13", tensor, (expert, slice(start, start + intermediate_size)))]
    if m := _FUSED.fullmatch(name):
        return [(f"{m[1]}.mlp.experts.{'w2' if m[2] == 'down_proj' else 'w13'}", tensor, None)]
    return None


class MixtralForCausalLM(LlamaForCausalLM):
    required_fields = ("num_local_experts", "num_experts_per_tok")

    def make_mlp(self, args: ModelArgs, layer: int) -> nn.Module:
        return SparseMoE(args.hidden_size, args.intermediate_size, args.num_local_experts, args.num_experts_per_tok)

    def map_weight(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor, Piece]]:
        name = name.removeprefix("model.")
        return (map_expert_weight(name, tensor, self.config.intermediate_size)
                or super().map_weight(name.replace(".block_sparse_moe.", ".mlp."), tensor))

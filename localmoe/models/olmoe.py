"""OLMoE (Muennighoff et al. 2024): the Llama decoder with a sparse MoE in every layer (64 experts, top-8 in
the published model) and QK-norm over the whole query and key projections, before they are split into heads.
The router's top-k softmax weights are renormalised only when `norm_topk_prob`; `clip_qkv` clamps q, k and
v after the norm (Attention reads it from the config)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from localmoe.layers.moe import SparseMoE
from localmoe.models.args import ModelArgs
from localmoe.models.llama import Attention, LlamaForCausalLM, Piece
from localmoe.models.mixtral import map_expert_weight


class OlmoeForCausalLM(LlamaForCausalLM):
    required_fields = ("num_experts", "num_experts_per_tok")

    def make_attention(self, args: ModelArgs, layer: int) -> Attention:
        return Attention(args, layer, qk_norm="full")

    def make_mlp(self, args: ModelArgs, layer: int) -> nn.Module:
        return SparseMoE(args.hidden_size, args.intermediate_size, args.num_experts, args.num_experts_per_tok,
                         renormalize=args.norm_topk_prob)

    def map_weight(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor, Piece]]:
        name = name.removeprefix("model.")
        return map_expert_weight(name, tensor, self.config.intermediate_size) or super().map_weight(name, tensor)

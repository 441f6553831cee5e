"""Qwen-MoE: Qwen1.5/Qwen2-MoE and Qwen3-MoE, the Llama decoder with fine-grained routed experts.

Every `decoder_sparse_step`-th layer is sparse unless listed in `mlp_only_layers`; the others keep a dense
SwiGLU of `intermediate_size`. Routed experts have `moe_intermediate_size` and a softmax top-k router,
renormalised over the k chosen when `norm_topk_prob`. Qwen2-MoE adds a shared expert that sees every token,
scaled by a sigmoid gate, and biases on q/k/v; Qwen3-MoE drops both and normalises each query and key head
(QK-norm).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from localmoe.layers.moe import SparseMoE
from localmoe.models.args import ModelArgs
from localmoe.models.llama import MLP, Attention, LlamaForCausalLM, Piece
from localmoe.models.mixtral import map_expert_weight


def is_sparse_layer(args: ModelArgs, layer: int) -> bool:
    return layer not in args.mlp_only_layers and (layer + 1) % args.decoder_sparse_step == 0


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    required_fields = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")

    def make_attention(self, args: ModelArgs, layer: int) -> Attention:
        return Attention(args, layer, qkv_bias=args.qkv_bias)

    def make_mlp(self, args: ModelArgs, layer: int) -> nn.Module:
        d = args.hidden_size
        if not is_sparse_layer(args, layer):
            return MLP(d, args.intermediate_size)
        shared_size = args.shared_expert_intermediate_size
        return SparseMoE(d, args.moe_intermediate_size, args.num_experts, args.num_experts_per_tok,
                         renormalize=args.norm_topk_prob,
                         shared_expert=MLP(d, shared_size) if shared_size else None,
                         shared_expert_gate=bool(shared_size))

    def map_weight(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor, Piece]]:
        name = name.removeprefix("model.")
        return map_expert_weight(name, tensor, self.config.moe_intermediate_size) or super().map_weight(name, tensor)


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    """Its configs name no shared expert, so make_mlp builds none; attention_bias covers q/k/v and o."""

    def make_attention(self, args: ModelArgs, layer: int) -> Attention:
        return Attention(args, layer, qk_norm="head")

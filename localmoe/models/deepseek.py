"""DeepSeek-V2 and DeepSeek-V3 (DeepSeek-AI 2024): multi-head latent attention (layers/mla.py) and DeepSeekMoE.

DeepSeekMoE splits the feed-forward into many small routed experts plus shared experts that see every token
(one SwiGLU of n_shared_experts * moe_intermediate_size, no gate); the first `first_k_dense_replace` layers
(and those off the `moe_layer_freq` beat) keep a dense SwiGLU. The versions differ in the router: V2 takes a
softmax, limited to the best groups of experts (`group_limited_greedy`); V3 a sigmoid plus a learned per-expert
correction bias that only steers the choice (layers/routing.py). V2 rotates adjacent rotary pairs; V3 as
`rope_interleave` says.

Checkpoints name routed experts one tensor each (`mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`, as the
hub and transformers' save_pretrained write them); fused ones (`mlp.experts.gate_up_proj`, `down_proj`) load
too. Layers past `num_hidden_layers` (V3's multi-token-prediction module) are not served.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from localmoe.layers.mla import MultiHeadLatentAttention
from localmoe.layers.moe import SparseMoE
from localmoe.layers.routing import biased_sigmoid_group_topk, group_limited_softmax_topk
from localmoe.models.args import ModelArgs
from localmoe.models.llama import MLP, LlamaForCausalLM, Piece
from localmoe.models.mixtral import map_expert_weight

_LAYER = re.compile(r"(?:model\.)?layers\.(\d+)\.")


class DeepseekV2MoE(SparseMoE):
    """Routed experts (softmax router, greedy or group-limited) plus the shared experts."""

    def __init__(self, args: ModelArgs, renormalize: bool = False) -> None:
        d, i = args.hidden_size, args.moe_intermediate_size
        num_shared = args.n_shared_experts
        shared = MLP(d, i * num_shared, args.mlp_bias) if num_shared else None
        super().__init__(d, i, args.n_routed_experts, args.num_experts_per_tok, renormalize=renormalize,
                         shared_expert=shared)
        self.scaling = args.routed_scaling_factor
        self.num_groups, self.topk_group = self.expert_groups(args)

    def expert_groups(self, args: ModelArgs) -> tuple[int, int]:
        """(groups the experts form, groups a token may choose from)."""
        method = args.topk_method
        if method == "greedy":
            return 1, 1
        if method == "group_limited_greedy":
            if args.n_group is None or args.topk_group is None:
                raise ValueError("DeepSeek-V2 topk_method group_limited_greedy needs n_group and topk_group")
            return args.n_group, args.topk_group
        raise ValueError(f"DeepSeek-V2 topk_method {method!r} is not supported (greedy, group_limited_greedy)")

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # never renormalised, as in transformers: norm_topk_prob is false in every V2 checkpoint
        return group_limited_softmax_topk(self.gate(x), self.top_k, self.num_groups, self.topk_group, self.scaling)


class DeepseekV3MoE(DeepseekV2MoE):
    """Routed experts (sigmoid router with a selection-only correction bias) plus the shared experts."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args, renormalize=args.norm_topk_prob)
        # float32 whatever the serving dtype: it separates experts whose scores are close
        self.e_score_correction_bias = nn.Parameter(torch.zeros(self.num_experts, dtype=torch.float32),
                                                    requires_grad=False)

    def expert_groups(self, args: ModelArgs) -> tuple[int, int]:
        return args.n_group or 1, args.topk_group or 1

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return biased_sigmoid_group_topk(self.gate(x), self.e_score_correction_bias, self.top_k, self.num_groups,
                                         self.topk_group, self.renormalize, self.scaling)


class DeepseekV2ForCausalLM(LlamaForCausalLM):
    moe_class: type[DeepseekV2MoE] = DeepseekV2MoE
    required_fields = ("n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size",
                       "routed_scaling_factor", "first_k_dense_replace", "kv_lora_rank", "qk_rope_head_dim",
                       "qk_nope_head_dim", "v_head_dim")

    def make_attention(self, args: ModelArgs, layer: int) -> nn.Module:
        return MultiHeadLatentAttention(args, interleaved_rope=True)

    def make_mlp(self, args: ModelArgs, layer: int) -> nn.Module:
        if layer >= args.first_k_dense_replace and layer % args.moe_layer_freq == 0:
            return self.moe_class(args)
        return super().make_mlp(args, layer)

    def map_weight(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor, Piece]]:
        name = name.removeprefix("model.")
        if experts := map_expert_weight(name, tensor, self.config.moe_intermediate_size):
            return experts
        name = name.replace(".mlp.shared_experts.", ".mlp.shared_expert.")
        return super().map_weight(name.replace(".mlp.gate.e_score_correction_bias", ".mlp.e_score_correction_bias"),
                                  tensor)

    def ignored_weight(self, name: str) -> bool:
        layer = _LAYER.match(name)
        return super().ignored_weight(name) or bool(layer and int(layer[1]) >= self.config.num_hidden_layers)


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    moe_class = DeepseekV3MoE
    required_fields = (*DeepseekV2ForCausalLM.required_fields, "norm_topk_prob")

    def make_attention(self, args: ModelArgs, layer: int) -> nn.Module:
        return MultiHeadLatentAttention(args, interleaved_rope=args.rope_interleave)

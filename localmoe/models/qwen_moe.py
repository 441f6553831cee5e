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
from localmoe.models.llama import MLP, Attention, LlamaForCausalLM, Piece
from localmoe.models.mixtral import map_expert_weight


def num_experts(cfg: dict) -> int:
    """The hub's configs say `num_experts`; transformers' Qwen3-MoE config writes `num_local_experts`."""
    return cfg["num_experts"] if "num_experts" in cfg else cfg["num_local_experts"]


def is_sparse_layer(cfg: dict, layer: int) -> bool:
    step = cfg.get("decoder_sparse_step") or 1
    return layer not in (cfg.get("mlp_only_layers") or []) and (layer + 1) % step == 0


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    def make_attention(self, cfg: dict, layer: int) -> Attention:
        return Attention(cfg, layer, qkv_bias=cfg.get("qkv_bias", True))

    def make_mlp(self, cfg: dict, layer: int) -> nn.Module:
        d = cfg["hidden_size"]
        if not is_sparse_layer(cfg, layer):
            return MLP(d, cfg["intermediate_size"])
        shared_size = cfg.get("shared_expert_intermediate_size")
        return SparseMoE(d, cfg["moe_intermediate_size"], num_experts(cfg), cfg["num_experts_per_tok"],
                         renormalize=bool(cfg.get("norm_topk_prob", False)),
                         shared_expert=MLP(d, shared_size) if shared_size else None,
                         shared_expert_gate=bool(shared_size))

    def map_weight(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor, Piece]]:
        name = name.removeprefix("model.")
        return map_expert_weight(name, tensor, self.config["moe_intermediate_size"]) or super().map_weight(name, tensor)


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    """Its configs name no shared expert, so make_mlp builds none; attention_bias covers q/k/v and o."""

    def make_attention(self, cfg: dict, layer: int) -> Attention:
        return Attention(cfg, layer, qk_norm="head")

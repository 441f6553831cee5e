"""Qwen-MoE: Qwen1.5/Qwen2-MoE and Qwen3-MoE, the Llama decoder with fine-grained routed experts.

Every `decoder_sparse_step`-th layer is sparse unless listed in `mlp_only_layers`; the others keep a dense
SwiGLU of `intermediate_size`. Routed experts have `moe_intermediate_size` and a softmax top-k router,
renormalised over the k chosen when `norm_topk_prob`. Qwen2-MoE adds a shared expert that sees every token,
scaled by a sigmoid gate, and biases on q/k/v; Qwen3-MoE drops both and normalises each query and key head
(QK-norm).
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from localmoe.layers.moe import SparseMoE
from localmoe.models.llama import MLP, Attention, LlamaForCausalLM, Piece

_PER_EXPERT = re.compile(r"(layers\.\d+\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_FUSED = re.compile(r"(layers\.\d+\.mlp)\.experts\.(gate_up_proj|down_proj)")


def map_expert_weight(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor, Piece]] | None:
    """Routed-expert tensors into SparseMoE's stacked w13 (gate rows, then up rows) and w2, whether stored one
    per expert (`experts.{e}.gate_proj.weight`, as the hub and transformers' save_pretrained write them) or
    fused (`experts.gate_up_proj` [E, 2I, D], `experts.down_proj` [E, D, I]); None for any other tensor."""
    if m := _PER_EXPERT.fullmatch(name):
        moe, expert, projection = m[1], int(m[2]), m[3]
        if projection == "down_proj":
            return [(f"{moe}.w2", tensor, expert)]
        rows = tensor.shape[0]
        start = 0 if projection == "gate_proj" else rows
        return [(f"{moe}.w13", tensor, (expert, slice(start, start + rows)))]
    if m := _FUSED.fullmatch(name):
        return [(f"{m[1]}.{'w13' if m[2] == 'gate_up_proj' else 'w2'}", tensor, None)]
    return None


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
        return map_expert_weight(name, tensor) or super().map_weight(name, tensor)


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    """Its configs name no shared expert, so make_mlp builds none; attention_bias covers q/k/v and o."""

    def make_attention(self, cfg: dict, layer: int) -> Attention:
        return Attention(cfg, layer, qk_norm="head")

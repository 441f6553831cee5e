"""Mixtral (Jiang et al. 2024): the Llama/Mistral decoder with a sparse MoE feed-forward.

Checkpoints name experts one tensor each (`block_sparse_moe.experts.{e}.w1/w2/w3.weight`);
transformers >= 5 fuses them in memory (`mlp.experts.gate_up_proj` [E, 2I, D], `down_proj`
[E, D, I]); both load into the stacked w1/w3/w2 of SparseMoE.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from localmoe.layers.moe import SparseMoE
from localmoe.models.llama import LlamaForCausalLM

_PER_EXPERT = re.compile(r"(layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w[123])\.weight")
_FUSED = re.compile(r"(layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\.(gate_up_proj|down_proj)")


class MixtralForCausalLM(LlamaForCausalLM):
    def make_mlp(self, cfg: dict) -> nn.Module:
        return SparseMoE(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"],
                         cfg["num_experts_per_tok"])

    def map_weight(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor, int | None]]:
        name = name.removeprefix("model.")
        if m := _PER_EXPERT.fullmatch(name):
            return [(f"{m[1]}.mlp.{m[3]}", tensor, int(m[2]))]
        if m := _FUSED.fullmatch(name):
            if m[2] == "down_proj":
                return [(f"{m[1]}.mlp.w2", tensor, None)]
            gate, up = tensor.chunk(2, dim=1)
            return [(f"{m[1]}.mlp.w1", gate, None), (f"{m[1]}.mlp.w3", up, None)]
        return super().map_weight(name.replace(".block_sparse_moe.gate.", ".mlp.gate."), tensor)

"""The decoder layers of a step in one kernel call, where a model has the common MoE shape (Mixtral's).

At one decode token the kernels of the 140M benchmark model read its weights in ~2.5 ms; the Python between them
(module calls, views, the router's topk and softmax, converting the arguments of ~60 kernel calls) cost ~1 ms
more, a third of the step, which llama.cpp does not pay. `decoder_layers` (decoder_cpu.cpp) runs the same kernels
in the same order from C++, so its numbers are the layers' own, bit for bit, and the model files stay the
reference: this is only a faster way to run what they say, taken when every part of the model is one it knows
(bf16 on our kernels, resident experts in tiles, plain attention); any other model runs its modules.

`RoutingObserver` watches the experts modules' inputs, which this path never calls, so it returns each layer's
expert ids for the caller to hand over (`RoutingObserver.note_layers`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from localmoe.experts.cpu import TiledExperts
from localmoe.layers import cpu_kernels
from localmoe.layers.attention import AttentionMetadata
from localmoe.layers.linear import Linear, MergedLinear
from localmoe.layers.moe import SparseMoE
from localmoe.layers.norm import RMSNorm
from localmoe.models.llama import Attention, DecoderLayer, LlamaForCausalLM


@dataclass
class FusedDecoder:
    model: LlamaForCausalLM
    weights: list[torch.Tensor]  # per layer: input norm, qkv, o, post-attention norm, router, w13, w2
    windows: list[int]
    heads: int
    kv_heads: int
    scale: float
    eps: float
    top_k: int
    renormalize: bool

    @classmethod
    def of(cls, model: nn.Module) -> FusedDecoder | None:
        """The fused path for `model` (packed for our kernels), or None where any part of it is one the path does
        not run exactly as the model's own code does."""
        if not (isinstance(model, LlamaForCausalLM) and type(model).forward is LlamaForCausalLM.forward
                and type(model).mlp_inputs is LlamaForCausalLM.mlp_inputs and cpu_kernels.kernels() is not None
                and model.embed_tokens.weight.dtype == torch.bfloat16 and _plain_norm(model.norm)):
            return None
        layers = list(model.layers)
        if not layers or not all(_fusable(layer) for layer in layers):
            return None
        first_attn, first_moe = layers[0].self_attn, layers[0].mlp
        # one set of these settings is given to the kernel for all layers, the rotary tables included
        settings = {(layer.self_attn.num_heads, layer.self_attn.num_kv_heads, layer.self_attn.scale, layer.mlp.top_k,
                     layer.mlp.renormalize, layer.input_layernorm.eps, layer.post_attention_layernorm.eps)
                    for layer in layers}
        if (len(settings) != 1 or model.norm.eps != layers[0].input_layernorm.eps
                or any(layer.self_attn.rotary is not first_attn.rotary for layer in layers)):
            return None
        weights = [t for layer in layers for t in (
            layer.input_layernorm.weight, layer.self_attn.qkv_proj.weight, layer.self_attn.o_proj.weight,
            layer.post_attention_layernorm.weight, layer.mlp.gate.weight, layer.mlp.experts.w13,
            layer.mlp.experts.w2)]
        return cls(model, weights, [layer.self_attn.sliding_window or 0 for layer in layers], first_attn.num_heads,
                   first_attn.num_kv_heads, first_attn.scale, model.norm.eps, first_moe.top_k, first_moe.renormalize)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(final hidden states [T, D], as model(...) returns them; each layer's expert ids [L, T, K])."""
        rotary = self.model.layers[0].self_attn.rotary
        return tuple(cpu_kernels.kernels().decoder_layers(
            self.model.embed_tokens(input_ids), positions, rotary.cos, rotary.signed_sin, kv_caches,
            meta.token_tables, meta.token_context, self.weights, self.windows, self.heads, self.kv_heads, self.scale,
            self.eps, self.top_k, self.renormalize, self.model.norm.weight))


def _plain_norm(norm: nn.Module) -> bool:
    return type(norm) is RMSNorm and norm.weight.dtype == torch.bfloat16


def _tiled(linear: nn.Module) -> bool:
    return type(linear) in (Linear, MergedLinear) and linear.tiled and linear.bias is None


def _fusable(layer: nn.Module) -> bool:
    """A layer the fused path runs as its modules would: pre-norm plain attention (no QK-norm, clipping, sinks,
    biases or interleaved rotary) and a softmax top-k sparse MoE block on resident bf16 experts in tiles, with no
    shared expert and no other router."""
    if type(layer) is not DecoderLayer or not (_plain_norm(layer.input_layernorm)
                                              and _plain_norm(layer.post_attention_layernorm)):
        return False
    attn, moe = layer.self_attn, layer.mlp
    if not (type(attn) is Attention and attn.q_norm is None and attn.clip_qkv is None and attn.sinks is None
            and _tiled(attn.qkv_proj) and _tiled(attn.o_proj) and not attn.rotary.interleaved
            and attn.rotary.cos.shape[-1] == attn.head_dim):
        return False
    return (type(moe) is SparseMoE and moe.shared_expert is None and moe.shared_expert_gate is None
            and _tiled(moe.gate) and type(moe.experts) is TiledExperts
            and isinstance(moe.experts.w13, torch.Tensor) and moe.experts.w13.dtype == torch.bfloat16)

"""The decoder layers of a step in one kernel call, where a model has the common MoE shape (Mixtral's).

At one decode token the kernels of the 140M benchmark model read its weights in ~2.5 ms; the Python between them
(module calls, views, the router's topk and softmax, converting the arguments of ~60 kernel calls) cost ~1 ms
more, a third of the step, which llama.cpp does not pay. `decoder_layers` (decoder_cpu.cpp) runs the same kernels
in the same order from C++, so its numbers are the layers' own, bit for bit, and the model files stay the
reference: this is only a faster way to run what they say, taken when every part of the model is one it knows
(bf16 activations on our kernels, resident experts in tiles, plain attention; weights in bf16 or quantized to 8 or 4
bits or float8); any other model runs its modules.

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
from localmoe.layers.cpu_kernels import QuantTiles
from localmoe.layers.linear import Linear, MergedLinear
from localmoe.layers.moe import SparseMoE
from localmoe.layers.norm import RMSNorm
from localmoe.layers.quant_linear import QuantLinear
from localmoe.models.llama import Attention, DecoderLayer, LlamaForCausalLM


@dataclass
class FusedDecoder:
    model: LlamaForCausalLM
    weights: list[torch.Tensor]  # per layer: input norm, qkv (3), o (3), post-attention norm, router, w13 (3), w2 (3)
    formats: list[int]  # per layer: of qkv, o, w13 and w2 (BFLOAT16, or the bits, negative for float8)
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
        weights, formats = [], []
        for layer in layers:
            attn, experts = layer.self_attn, layer.mlp.experts
            matmuls = [_matmul(attn.qkv_proj), _matmul(attn.o_proj), _matmul(experts.w13), _matmul(experts.w2)]
            weights += [layer.input_layernorm.weight, *matmuls[0][0], *matmuls[1][0],
                        layer.post_attention_layernorm.weight, layer.mlp.gate.weight, *matmuls[2][0], *matmuls[3][0]]
            formats += [form for _, form in matmuls]
        return cls(model, weights, formats, [layer.self_attn.sliding_window or 0 for layer in layers],
                   first_attn.num_heads, first_attn.num_kv_heads, first_attn.scale, model.norm.eps, first_moe.top_k,
                   first_moe.renormalize)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(final hidden states [T, D], as model(...) returns them; each layer's expert ids [L, T, K])."""
        rotary = self.model.layers[0].self_attn.rotary
        return tuple(cpu_kernels.kernels().decoder_layers(
            self.model.embed_tokens(input_ids), positions, rotary.cos, rotary.signed_sin, kv_caches,
            meta.token_tables, meta.token_context, self.weights, self.formats, self.windows, self.heads, self.kv_heads, self.scale,
            self.eps, self.top_k, self.renormalize, self.model.norm.weight))


BFLOAT16 = 16  # a matmul's format: bf16 tiles (decoder_cpu.cpp's kBFloat16)
_UNUSED = torch.empty(0)


def _matmul(weight: nn.Module | torch.Tensor | QuantTiles) -> tuple[tuple[torch.Tensor, ...], int]:
    """A matmul's three tensors and its format: a tiled Linear's or stacked experts' bf16 tiles, or the quantized
    tiles of a QuantLinear or of quantized experts."""
    if isinstance(weight, QuantLinear):
        weight = QuantTiles(weight.q, weight.scales, weight.zeros, weight.bits, weight.float8)
    elif isinstance(weight, Linear):
        weight = weight.weight
    if isinstance(weight, QuantTiles):
        return weight.tensors(), -weight.bits if weight.float8 else weight.bits
    return (weight, _UNUSED, _UNUSED), BFLOAT16


def _plain_norm(norm: nn.Module) -> bool:
    return type(norm) is RMSNorm and norm.weight.dtype == torch.bfloat16


def _tiled(linear: nn.Module, quantized: bool = True) -> bool:
    """A Linear on bf16 tiles or (where `quantized`) a QuantLinear on the quantized kernel's, without a bias."""
    if quantized and type(linear) is QuantLinear:
        return linear.kernel and linear.bias is None
    return type(linear) in (Linear, MergedLinear) and linear.tiled and linear.bias is None


def _fusable(layer: nn.Module) -> bool:
    """A layer the fused path runs as its modules would: pre-norm plain attention (no QK-norm, clipping, sinks,
    biases or interleaved rotary) and a softmax top-k sparse MoE block on resident experts in tiles (bf16 or
    quantized), with no shared expert and no other router."""
    if type(layer) is not DecoderLayer or not (_plain_norm(layer.input_layernorm)
                                              and _plain_norm(layer.post_attention_layernorm)):
        return False
    attn, moe = layer.self_attn, layer.mlp
    if not (type(attn) is Attention and attn.q_norm is None and attn.clip_qkv is None and attn.sinks is None
            and _tiled(attn.qkv_proj) and _tiled(attn.o_proj) and not attn.rotary.interleaved
            and attn.rotary.cos.shape[-1] == attn.head_dim):
        return False
    return (type(moe) is SparseMoE and moe.shared_expert is None and moe.shared_expert_gate is None
            and _tiled(moe.gate, quantized=False) and type(moe.experts) is TiledExperts and _same_kind(moe.experts))


def _same_kind(experts: TiledExperts) -> bool:
    """w13 and w2 both bf16 tiles, or both quantized with float8 for both or neither (one flag in the kernel)."""
    w13, w2 = experts.w13, experts.w2
    if isinstance(w13, QuantTiles) and isinstance(w2, QuantTiles):
        return w13.float8 == w2.float8
    return isinstance(w13, torch.Tensor) and isinstance(w2, torch.Tensor) and w13.dtype == torch.bfloat16

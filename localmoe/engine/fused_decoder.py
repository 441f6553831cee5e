"""The decoder layers of a step in one kernel call, where a model has a common MoE shape (Mixtral's, Qwen's, OLMoE's).

At one decode token the kernels of the 140M benchmark model read its weights in ~2.5 ms; the Python between them
(module calls, views, the router's topk and softmax, converting the arguments of ~60 kernel calls) cost ~1 ms
more, a third of the step, which llama.cpp does not pay. `decoder_layers` (decoder_cpu.cpp) runs the same kernels
in the same order from C++, so its numbers are the layers' own, bit for bit, and the model files stay the
reference: this is only a faster way to run what they say, taken when every part of the model is one it knows
(bf16 activations on our kernels, resident experts in tiles; q/k/v biases, QK-norm, clipping and a gated shared
expert where the family has them; weights in bf16 or quantized to 8 or 4 bits or float8); any other model (MLA,
sinks, other routers, offloaded experts, dense layers among the MoE ones, float32) runs its modules.

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
from localmoe.models.llama import MLP, Attention, DecoderLayer, LlamaForCausalLM


@dataclass
class FusedDecoder:
    model: LlamaForCausalLM
    weights: list[torch.Tensor]  # per layer, in decoder_cpu.cpp's Slot order (absent parts: empty tensors)
    formats: list[int]  # per layer, in decoder_cpu.cpp's Format order (BFLOAT16, or the bits, negative for float8)
    windows: list[int]
    heads: int
    kv_heads: int
    scale: float
    eps: float
    clip: float  # q, k and v clamped to +-clip; -1: not
    top_k: int
    renormalize: bool
    shared_size: int  # the shared expert's intermediate size; 0: none

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
        # one set of settings is given to the kernel for all layers, the rotary tables included
        settings = {_settings(layer) for layer in layers}
        first_attn, first_moe = layers[0].self_attn, layers[0].mlp
        if (len(settings) != 1 or {model.norm.eps} != _settings(layers[0])[-1]
                or any(layer.self_attn.rotary is not first_attn.rotary for layer in layers)):
            return None
        weights, formats = [], []
        for layer in layers:
            layer_weights, layer_formats = _layer_tensors(layer)
            weights += layer_weights
            formats += layer_formats
        shared = first_moe.shared_expert
        return cls(model, weights, formats, [layer.self_attn.sliding_window or 0 for layer in layers],
                   first_attn.num_heads, first_attn.num_kv_heads, first_attn.scale, model.norm.eps,
                   -1.0 if first_attn.clip_qkv is None else float(first_attn.clip_qkv), first_moe.top_k,
                   first_moe.renormalize, 0 if shared is None else shared.down_proj.in_features)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(final hidden states [T, D], as model(...) returns them; each layer's expert ids [L, T, K])."""
        rotary = self.model.layers[0].self_attn.rotary
        return tuple(cpu_kernels.kernels().decoder_layers(
            self.model.embed_tokens(input_ids), positions, rotary.cos, rotary.signed_sin, kv_caches,
            meta.token_tables, meta.token_context, self.weights, self.formats, self.windows, self.heads,
            self.kv_heads, self.scale, self.eps, self.clip, self.top_k, self.renormalize, self.shared_size,
            self.model.norm.weight))


BFLOAT16 = 16  # a matmul's format: bf16 tiles (decoder_cpu.cpp's kBFloat16)
_ABSENT = torch.empty(0)


def _settings(layer: DecoderLayer) -> tuple:
    """What the kernel takes once for all layers; the norms' epsilons last, as a set (one value: one eps)."""
    attn, moe = layer.self_attn, layer.mlp
    norms = [layer.input_layernorm, layer.post_attention_layernorm, attn.q_norm, attn.k_norm]
    shared = moe.shared_expert
    return (attn.num_heads, attn.num_kv_heads, attn.scale, attn.clip_qkv, attn.q_norm is None, moe.top_k,
            moe.renormalize, None if shared is None else shared.down_proj.in_features,
            moe.shared_expert_gate is None, frozenset(norm.eps for norm in norms if norm is not None))


def _layer_tensors(layer: DecoderLayer) -> tuple[list[torch.Tensor], list[int]]:
    """A layer's tensors in decoder_cpu.cpp's Slot order and its matmuls' formats in Format order."""
    attn, moe = layer.self_attn, layer.mlp
    shared, shared_gate = moe.shared_expert, moe.shared_expert_gate
    absent = ((_ABSENT,) * 3, BFLOAT16)
    qkv, o, w13, w2 = (_matmul(part) for part in (attn.qkv_proj, attn.o_proj, moe.experts.w13, moe.experts.w2))
    gate_up, down = (absent, absent) if shared is None else (_matmul(shared.gate_up_proj), _matmul(shared.down_proj))
    weights = [layer.input_layernorm.weight, *qkv[0], _or_absent(attn.qkv_proj.bias), *o[0],
               _or_absent(attn.o_proj.bias), _or_absent(attn.q_norm), _or_absent(attn.k_norm),
               layer.post_attention_layernorm.weight, moe.gate.weight, *w13[0], *w2[0], *gate_up[0], *down[0],
               _or_absent(shared_gate)]
    return weights, [qkv[1], o[1], w13[1], w2[1], gate_up[1], down[1]]


def _or_absent(part: nn.Module | torch.Tensor | None) -> torch.Tensor:
    """A bias, or a module's weight (a norm's, a gate's); an empty tensor where there is none."""
    if part is None:
        return _ABSENT
    return part.weight if isinstance(part, nn.Module) else part


def _matmul(weight: nn.Module | torch.Tensor | QuantTiles) -> tuple[tuple[torch.Tensor, ...], int]:
    """A matmul's three tensors and its format: a tiled Linear's or stacked experts' bf16 tiles, or the quantized
    tiles of a QuantLinear or of quantized experts."""
    if isinstance(weight, QuantLinear):
        weight = QuantTiles(weight.q, weight.scales, weight.zeros, weight.bits, weight.float8)
    elif isinstance(weight, Linear):
        weight = weight.weight
    if isinstance(weight, QuantTiles):
        return weight.tensors(), -weight.bits if weight.float8 else weight.bits
    return (weight, _ABSENT, _ABSENT), BFLOAT16


def _plain_norm(norm: nn.Module | None) -> bool:
    return type(norm) is RMSNorm and norm.weight.dtype == torch.bfloat16


def _tiled(linear: nn.Module, quantized: bool = True, bias: bool = False) -> bool:
    """A Linear on bf16 tiles or (where `quantized`) a QuantLinear on the quantized kernel's; a bias where `bias`."""
    if quantized and type(linear) is QuantLinear:
        return linear.kernel and (bias or linear.bias is None)
    return type(linear) in (Linear, MergedLinear) and linear.tiled and (bias or linear.bias is None)


def _fusable(layer: nn.Module) -> bool:
    """A layer the fused path runs as its modules would: pre-norm attention (no sinks, no interleaved rotary) and a
    softmax top-k sparse MoE block on resident experts in tiles (bf16 or quantized), with or without a SwiGLU shared
    expert and its gate."""
    if type(layer) is not DecoderLayer or not (_plain_norm(layer.input_layernorm)
                                              and _plain_norm(layer.post_attention_layernorm)):
        return False
    attn, moe = layer.self_attn, layer.mlp
    if not (type(attn) is Attention and attn.sinks is None and _tiled(attn.qkv_proj, bias=True)
            and _tiled(attn.o_proj, bias=True) and not attn.rotary.interleaved
            and attn.rotary.cos.shape[-1] == attn.head_dim and attn.head_dim % 16 == 0 and attn.head_dim <= 128
            and (attn.q_norm is None or (_plain_norm(attn.q_norm) and _plain_norm(attn.k_norm)))):
        return False
    if type(moe) is not SparseMoE:
        return False
    shared, shared_gate = moe.shared_expert, moe.shared_expert_gate
    return (_tiled(moe.gate, quantized=False) and type(moe.experts) is TiledExperts and _same_kind(moe.experts)
            and (shared is None or (type(shared) is MLP and _tiled(shared.gate_up_proj) and _tiled(shared.down_proj)))
            and (shared_gate is None or (shared is not None and _tiled(shared_gate, quantized=False))))


def _same_kind(experts: TiledExperts) -> bool:
    """w13 and w2 both bf16 tiles, or both quantized with float8 for both or neither (one flag in the kernel)."""
    w13, w2 = experts.w13, experts.w2
    if isinstance(w13, QuantTiles) and isinstance(w2, QuantTiles):
        return w13.float8 == w2.float8
    return isinstance(w13, torch.Tensor) and isinstance(w2, torch.Tensor) and w13.dtype == torch.bfloat16

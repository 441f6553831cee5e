"""gpt-oss (OpenAI 2025): a pre-norm MoE decoder whose layers alternate sliding-window and full attention
(`layer_types`), with YaRN rope, biased projections, a learned attention sink per head, a biased router
(softmax over the k best logits) and experts with biases and a clamped SwiGLU.

Checkpoints (transformers' save_pretrained, the hub's bf16 copies) store the experts fused and transposed:
`mlp.experts.gate_up_proj` [E, D, 2I] with the gate and up columns interleaved (gate at even columns),
`gate_up_proj_bias` [E, 2I], `down_proj` [E, I, D], `down_proj_bias` [E, D]. They load into GroupedExperts'
w13 [E, 2I, D] (gate rows then up rows) and w2 [E, D, I]. The router is `mlp.router.weight/bias`.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Iterable

import torch
from torch import nn

from localmoe.layers.moe import SparseMoE
from localmoe.models.args import ModelArgs
from localmoe.models.llama import Attention, LlamaForCausalLM, Piece

_EXPERTS = re.compile(r"(layers\.\d+\.mlp)\.experts\.(gate_up_proj|down_proj)(_bias)?")


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's expert activation: the gate clamped from above and up on both sides at `limit`, then
    (up + 1) * gate * sigmoid(alpha * gate)."""
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


class GptOssForCausalLM(LlamaForCausalLM):
    required_fields = ("num_local_experts", "num_experts_per_tok")

    def __init__(self, args: ModelArgs) -> None:
        if quantization := args.quantization_config:
            raise ValueError(
                f"this gpt-oss checkpoint is quantized ({quantization.get('quant_method')}: its experts are stored "
                "as *_blocks/*_scales); LocalMoE serves gpt-oss from bfloat16 or float32 weights. Dequantize it "
                "first: transformers' GptOssForCausalLM.from_pretrained(path, dtype=torch.bfloat16, "
                "quantization_config=Mxfp4Config(dequantize=True)).save_pretrained(new_path), or use a bf16 copy")
        super().__init__(args)

    def make_attention(self, args: ModelArgs, layer: int) -> nn.Module:
        return Attention(args, layer, sinks=True)

    def make_mlp(self, args: ModelArgs, layer: int) -> nn.Module:
        activation = partial(clamped_swiglu, alpha=args.swiglu_alpha, limit=args.swiglu_limit)
        return SparseMoE(args.hidden_size, args.intermediate_size, args.num_local_experts, args.num_experts_per_tok,
                         router_bias=True, expert_bias=True, activation=activation)

    def map_weight(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor, Piece]]:
        name = name.removeprefix("model.")
        if not (m := _EXPERTS.fullmatch(name)):
            return super().map_weight(name.replace(".mlp.router.", ".mlp.gate."), tensor)
        mlp, projection, bias = m[1], m[2], m[3] or ""
        rows = tensor if bias else tensor.transpose(1, 2)  # one row per output feature, like w13 and w2
        if projection == "down_proj":
            return [(f"{mlp}.experts.w2{bias}", rows, None)]
        size = self.config.intermediate_size
        return [(f"{mlp}.experts.w13{bias}", rows[:, 0::2], (slice(None), slice(0, size))),
                (f"{mlp}.experts.w13{bias}", rows[:, 1::2], (slice(None), slice(size, 2 * size)))]

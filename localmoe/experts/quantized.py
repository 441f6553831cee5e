"""Experts quantized at load (quant/), swapped in for GroupedExperts by the experts pass (experts/runtime.py).

- `QuantTiledExperts`: our CPU kernel on the 8- or 4-bit tiles (`fused_moe` on QuantTiles): a decode step reads
  its experts' integers and scales, dequantized in registers.
- `QuantGroupedExperts`: the reference path (float32 activations, CUDA, shapes the kernel does not take): each
  active expert dequantized when a step needs it, then the grouped path.
"""

from __future__ import annotations

import torch

from localmoe.layers.cpu_kernels import QuantTiles, fused_moe, gate_up_paired, quant_kernel_serves
from localmoe.layers.moe import Experts, ExpertWeights, GroupedExperts, mix, pair_outputs
from localmoe.experts.cpu import grouped_kernel_serves
from localmoe.quant.scheme import QuantScheme
from localmoe.quant.weight import QuantizedWeight


class QuantTiledExperts(Experts):
    """w13 (rows gate_up_paired) and w2 as QuantTiles; their tensors are this module's buffers."""

    def __init__(self, w13: QuantTiles, w2: QuantTiles) -> None:
        super().__init__()
        self.num_experts = w13.q.shape[0]
        self.w13, self.w2 = w13, w2
        for name, tiles in (("w13", w13), ("w2", w2)):
            for part, tensor in zip(("q", "scales", "zeros"), tiles.tensors()):
                self.register_buffer(f"{name}_{part}", tensor, persistent=False)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return fused_moe(x, ids, weights, self.w13, self.w2)

    def partial(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return fused_moe(x, ids, weights, self.w13, self.w2, float_out=True)

    def combine(self, weights: torch.Tensor, total: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return total.to(dtype)


class QuantGroupedExperts(Experts):
    """GroupedExperts whose w13 and w2 are QuantizedWeights, dequantized per active expert in the activations'
    dtype; biases and activation as they were."""

    def __init__(self, experts: GroupedExperts, w13: QuantizedWeight, w2: QuantizedWeight) -> None:
        super().__init__()
        self.num_experts = experts.num_experts
        self.activation = experts.activation
        self.dtype = experts.w13.dtype
        self.w13_bias, self.w2_bias = experts.w13_bias, experts.w2_bias
        self.bits = w13.bits
        for name, weight in (("w13", w13), ("w2", w2)):
            for part in ("packed", "scales", "zeros"):
                self.register_buffer(f"{name}_{part}", getattr(weight, part), persistent=False)

    def weight(self, name: str, index: int) -> torch.Tensor:
        parts = (getattr(self, f"{name}_{part}")[index] for part in ("packed", "scales", "zeros"))
        return QuantizedWeight(*parts, self.bits).dequantize(self.dtype)

    def expert(self, index: int) -> ExpertWeights:
        w13, w2 = self.weight("w13", index), self.weight("w2", index)
        if self.w13_bias is None:
            return w13, w2, None, None
        return w13, w2, self.w13_bias[index], self.w2_bias[index]

    def partial(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return pair_outputs(x, ids, self.num_experts, self.expert, self.activation)

    def combine(self, weights: torch.Tensor, total: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return mix(weights, total)


def quantize_experts(experts: GroupedExperts, scheme: QuantScheme) -> Experts:
    """`experts` quantized by `scheme`: on the kernel where it serves them, else the reference path."""
    w13, w2 = (scheme.quantize(w.data) for w in (experts.w13, experts.w2))
    if grouped_kernel_serves(experts) and quant_kernel_serves(w13) and quant_kernel_serves(w2):
        return QuantTiledExperts(QuantTiles.of(w13, gate_up_paired), QuantTiles.of(w2))
    return QuantGroupedExperts(experts, w13, w2)

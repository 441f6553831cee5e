"""Resident experts in the layouts a CPU reads fastest, swapped in for GroupedExperts after loading.

- `TiledExperts`: bf16 SwiGLU experts without biases in our kernel's tiles (layers/cpu_kernels.py, `fused_moe`
  routes, runs and mixes a step's pairs in one call), on huge pages.
- `OneDNNExperts`: everything else (float32, biases, other activations) as one oneDNN-blocked weight per
  expert (layers/linear.py), about twice as fast as row-major at decode sizes, run by the grouped path.
"""

from __future__ import annotations

import torch
from torch import nn

from localmoe.layers.cpu_kernels import QuantTiles, expert_tiles, fused_moe, kernels
from localmoe.layers.huge_pages import on_huge_pages
from localmoe.layers.linear import pack_weight
from localmoe.layers.moe import Activation, Experts, GroupedExperts, GroupedPathExperts, swiglu


def kernel_serves(activation: Activation, bias: bool, dtype: torch.dtype, device: torch.device,
                  hidden_size: int, intermediate_size: int) -> bool:
    """bf16 on a CPU where our kernel builds, for plain SwiGLU experts without biases (all the kernel computes),
    in sizes that fit its tiles."""
    return (activation is swiglu and not bias and device.type == "cpu" and dtype == torch.bfloat16
            and hidden_size % 16 == 0 and intermediate_size % 16 == 0 and kernels() is not None)


def grouped_kernel_serves(experts: GroupedExperts) -> bool:
    hidden_size, intermediate_size = experts.w2.shape[1:]
    return kernel_serves(experts.activation, experts.w13_bias is not None, experts.w13.dtype, experts.w13.device,
                         hidden_size, intermediate_size)


class TiledExperts(Experts):
    """Experts in the kernel's tiles: w13 and w2 as expert_tiles lays them out (or cache slots in that layout,
    for offloaded experts), or as QuantTiles (experts/quantized.py), whose tensors are then this module's buffers.
    Partial sums are the kernel's float32 sums, rounded once in combine."""

    def __init__(self, w13: torch.Tensor | QuantTiles, w2: torch.Tensor | QuantTiles) -> None:
        super().__init__()
        for name, weight in (("w13", w13), ("w2", w2)):
            if isinstance(weight, QuantTiles):
                setattr(self, name, weight)
                for part, tensor in zip(QuantTiles.PARTS, weight.tensors()):
                    self.register_buffer(f"{name}_{part}", tensor, persistent=False)
            else:
                self.register_buffer(name, weight, persistent=False)
        self.num_experts = len(w13.q if isinstance(w13, QuantTiles) else w13)

    @classmethod
    def of(cls, experts: GroupedExperts) -> "TiledExperts":
        return cls(*map(on_huge_pages, expert_tiles(experts.w13.data, experts.w2.data)))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return fused_moe(x, ids, weights, self.w13, self.w2)

    def partial(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return fused_moe(x, ids, weights, self.w13, self.w2, float_out=True)

    def combine(self, weights: torch.Tensor, total: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return total.to(dtype)


class OneDNNExperts(GroupedPathExperts):
    """Each expert's w13 and w2 in oneDNN's blocked layout; the biases stay as they were."""

    def __init__(self, experts: GroupedExperts) -> None:
        super().__init__()
        self.num_experts = experts.num_experts
        self.activation = experts.activation
        self.packed = [(pack_weight(experts.w13[e]), pack_weight(experts.w2[e])) for e in range(self.num_experts)]
        self.w13_bias, self.w2_bias = experts.w13_bias, experts.w2_bias

    def weights_of(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.packed[index]


def packed_bytes(experts: nn.Module) -> int:
    """Bytes of an OneDNNExperts' packed weights (opaque tensors: parameters() does not list them)."""
    if not isinstance(experts, OneDNNExperts):
        return 0
    return sum(t.numel() * t.element_size() for pair in experts.packed for t in pair)

"""Resident experts on CUDA: SwiGLU experts without biases run by the fused Triton kernels (layers/triton_moe.py),
which sort a step's pairs by expert, run only the active experts and apply the routing weights in the epilogue.
Other experts (biases, other activations) keep the grouped PyTorch path.
"""

from __future__ import annotations

import torch

from localmoe.layers import triton_kernels
from localmoe.layers.moe import Experts, GroupedExperts, swiglu


def triton_serves(experts: GroupedExperts) -> bool:
    return experts.activation is swiglu and experts.w13_bias is None and triton_kernels.runs_here(experts.w13)


class TritonExperts(Experts):
    """The GroupedExperts' own stacked weights (shared, not copied); partial sums are the kernel's float32 sums,
    rounded once in combine."""

    def __init__(self, experts: GroupedExperts) -> None:
        super().__init__()
        self.num_experts = experts.num_experts
        self.w13, self.w2 = experts.w13, experts.w2

    def partial(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        from localmoe.layers.triton_moe import fused_moe
        return fused_moe(x, self.w13, self.w2, weights, ids)

    def combine(self, weights: torch.Tensor, total: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return total.to(dtype)

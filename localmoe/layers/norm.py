"""RMSNorm (Zhang & Sennrich 2019): on CPU our kernel (rms_norm_cpu.cpp), elsewhere PyTorch's fused one; both
accumulate in float32 for bf16 inputs."""

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.layers import cpu_kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype and not torch.is_grad_enabled() and cpu_kernels.runs_here(x):
            return cpu_kernels.kernels().rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)

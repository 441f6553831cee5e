"""RMSNorm (Zhang & Sennrich 2019): on CPU our kernel (rms_norm_cpu.cpp), elsewhere PyTorch's fused one; both
accumulate in float32 for bf16 inputs. A pre-norm layer adds each sublayer's output to the residual stream and
normalises the sum for the next sublayer: given the residual, the norm does both (one kernel call)."""

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
        if self._kernel_takes(x):
            return cpu_kernels.kernels().rms_norm(x, None, self.weight, self.eps)[0]
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)

    def add(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual), x + residual): a sublayer's output x joins the residual stream, which is normalised
        for the next sublayer; with no residual yet (the first layer) x is the stream."""
        if residual is None:
            return self(x), x
        if self._kernel_takes(x):
            normed, stream = cpu_kernels.kernels().rms_norm(x, residual, self.weight, self.eps)
            return normed, stream
        stream = x + residual
        return F.rms_norm(stream, self.weight.shape, self.weight, self.eps), stream

    def _kernel_takes(self, x: torch.Tensor) -> bool:
        return x.dtype == self.weight.dtype and not torch.is_grad_enabled() and cpu_kernels.runs_here(x)

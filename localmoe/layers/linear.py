"""Linear layers and the CPU weight layout that makes small-batch matmuls fast.

Decode steps multiply a few rows by large weights. On CPU, oneDNN runs that about twice as fast
when the weight is stored once in its own blocked layout instead of row-major (measured on the
benchmark model's shapes: a [2048, 512] bf16 weight times 1 row, 72 -> 34 us; the 32000-row
output head, 2.1 -> 1.0 ms). `pack_weight` makes that layout; `linear` runs either kind. The engine
packs every Linear and expert after loading (`pack_model`); the row-major copy is freed.

At the smallest batches (a decode step of a few sequences) our own kernel (`linear_bf16` in
fused_moe_cpu.cpp, which reads each weight row once for every token) is faster again (the same head at one
row: 1.3 -> 0.95 ms; a [512, 512] weight: 52 -> 20 us), so bf16 layers keep their row-major weight beside
the packed one for it; a tied output head's row-major weight is the embedding itself.

MergedLinear runs projections of the same input as one matmul (q/k/v, gate/up): checkpoints store
each projection as its own tensor; the loader writes each into its rows of the merged weight.
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.layers import cpu_kernels

# bf16 layers run our kernel on their row-major weight up to this many rows of input, and always when the weight
# has at most KERNEL_ALWAYS_ROWS rows (a router: oneDNN's ~18 us a call is all overhead there, ours takes ~4)
KERNEL_MAX_TOKENS = 4
KERNEL_ALWAYS_ROWS = 64


def packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] -> an opaque oneDNN tensor of the same shape, for `linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        # the weight as loaded, kept beside the packed one for our kernel (see pack)
        self.register_buffer("row_major", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.row_major is not None and x.dim() == 2 and x.dtype == torch.bfloat16
                and (x.shape[0] <= KERNEL_MAX_TOKENS or self.out_features <= KERNEL_ALWAYS_ROWS)):
            out = cpu_kernels.kernels().linear_bf16(x, self.row_major)
            return out if self.bias is None else out + self.bias
        return linear(x, self.weight, self.bias)

    def pack(self) -> None:
        weight = self.weight.detach()
        packed = pack_weight(weight)
        del self.weight  # a tied output head keeps the embedding's parameter; only this reference goes
        self.register_buffer("weight", packed, persistent=False)
        if weight.dtype == torch.bfloat16 and weight.is_contiguous() and cpu_kernels.runs_here(weight):
            self.row_major = weight


class MergedLinear(Linear):
    def __init__(self, in_features: int, out_sizes: dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(out_sizes.values()), bias=bias)
        ends = list(accumulate(out_sizes.values()))
        # checkpoint projection name -> its rows in the merged weight
        self.pieces = {name: slice(end - size, end) for (name, size), end in zip(out_sizes.items(), ends)}


def pack_model(model: nn.Module) -> None:
    """Move every packable weight (Linear layers, stacked experts) into the packed layout."""
    for module in list(model.modules()):
        if hasattr(module, "pack"):
            module.pack()

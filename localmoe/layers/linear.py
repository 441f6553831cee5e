"""Linear layers and the CPU weight layouts that make their matmuls fast.

`pack_model` moves every weight into the layout its matmul reads best, once, after loading:

- bf16 on CPUs with AVX512-BF16: tiles (layers/cpu_kernels.py, `linear_tiles`) for our kernel, at every batch
  size, on huge pages (layers/huge_pages.py). At decode sizes it reads the weight once for all rows (the
  32000-row output head at one row: 0.40 ms, oneDNN 0.78; a [512, 512] weight at 16 rows: 24 us, oneDNN 43) and
  at 256 rows it is within 7% of oneDNN.
- Otherwise (float32, no kernel) oneDNN's own blocked layout, about twice as fast as row-major at small batches
  (a [2048, 512] bf16 weight times 1 row, 72 -> 34 us).

MergedLinear runs projections of the same input as one matmul (q/k/v, gate/up): checkpoints store
each projection as its own tensor; the loader writes each into its rows of the merged weight.
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.layers import cpu_kernels
from localmoe.layers.huge_pages import on_huge_pages


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
        self.tiled = False  # the weight is in tiles for our kernel (see pack)
        self.keep_dense = False  # set where the weight must stay as it is: routers, weights read by others

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tiled:
            rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)  # a step's tokens are already rows
            out = cpu_kernels.tiled_linear(rows, self.weight, self.out_features)
            out = out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)
            return out if self.bias is None else out + self.bias
        return linear(x, self.weight, self.bias)

    def pack(self) -> None:
        weight = self.weight.detach()
        self.tiled = (weight.dtype == torch.bfloat16 and self.in_features % 2 == 0
                      and cpu_kernels.runs_here(weight))
        del self.weight  # a tied output head keeps the embedding's parameter; only this reference goes
        self.register_buffer("weight", on_huge_pages(cpu_kernels.linear_tiles(weight)) if self.tiled
                             else pack_weight(weight), persistent=False)


class MergedLinear(Linear):
    def __init__(self, in_features: int, out_sizes: dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(out_sizes.values()), bias=bias)
        ends = list(accumulate(out_sizes.values()))
        # checkpoint projection name -> its rows in the merged weight
        self.pieces = {name: slice(end - size, end) for (name, size), end in zip(out_sizes.items(), ends)}


def pack_model(model: nn.Module) -> None:
    """Move every Linear layer's weight into the packed layout (experts: experts/runtime.py)."""
    for module in list(model.modules()):
        if hasattr(module, "pack"):
            module.pack()

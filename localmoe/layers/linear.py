"""Linear layers and the CPU weight layout that makes small-batch matmuls fast.

Decode steps multiply a few rows by large weights. On CPU, oneDNN runs that about twice as fast
when the weight is stored once in its own blocked layout instead of row-major (measured on the
benchmark model's shapes: a [2048, 512] bf16 weight times 1 row, 72 -> 34 us; the 32000-row
output head, 2.1 -> 1.0 ms). `pack_weight` makes that layout; `linear` runs either kind. The engine
packs every Linear and expert after loading (`pack_model`); the row-major copy is freed.

MergedLinear runs projections of the same input as one matmul (q/k/v, gate/up): checkpoints store
each projection as its own tensor; the loader writes each into its rows of the merged weight.
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn


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
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def pack(self) -> None:
        packed = pack_weight(self.weight)
        del self.weight  # a tied output head keeps the embedding's parameter; only this reference goes
        self.register_buffer("weight", packed, persistent=False)


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

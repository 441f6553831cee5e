"""A linear layer on a weight-only quantized weight (quant/weight.py).

On CPUs where our kernels run, the weight stays in its 8 or 4 bits (or float8) in tiles and is dequantized in registers
(layers/cpu_kernels.py, `tiled_linear_quant`): a decode step reads a quarter or an eighth of the bf16 bytes.
Elsewhere (float32 activations, CUDA) the weight is dequantized where it is used, the reference path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.layers import cpu_kernels
from localmoe.layers.linear import Linear
from localmoe.quant.scheme import Quantizer
from localmoe.quant.weight import QuantizedWeight


class QuantLinear(nn.Module):
    """A Linear's bias and its weight quantized: `q`, `scales`, `zeros` are the kernel's QuantTiles where it serves,
    else the QuantizedWeight's own tensors."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None, kernel: bool) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bits, self.float8 = weight.bits, weight.float8
        self.kernel = kernel
        tiles = cpu_kernels.quant_linear_tiles(weight) if kernel else None
        self.register_buffer("q", tiles.q if kernel else weight.packed, persistent=False)
        self.register_buffer("scales", tiles.scales if kernel else weight.scales, persistent=False)
        self.register_buffer("zeros", tiles.zeros if kernel else weight.zeros, persistent=False)
        self.bias = bias

    @classmethod
    def of(cls, linear: Linear, weight: QuantizedWeight) -> "QuantLinear":
        """`linear` with `weight` (its own, quantized); the kernel serves where the activations will be bf16."""
        dtype = linear.weight.dtype
        kernel = (dtype == torch.bfloat16 and cpu_kernels.runs_here(linear.weight)
                  and cpu_kernels.quant_kernel_serves(weight))
        return cls(weight, linear.bias, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel:
            rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
            tiles = cpu_kernels.QuantTiles(self.q, self.scales, self.zeros, self.bits, self.float8)
            out = cpu_kernels.tiled_linear_quant(rows, tiles, self.out_features)
            out = out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)
            return out if self.bias is None else out + self.bias
        weight = QuantizedWeight(self.q, self.scales, self.zeros, self.bits, self.float8).dequantize(x.dtype)
        return F.linear(x, weight, self.bias)


def quantize_linears(model: nn.Module, quantizer: Quantizer) -> int:
    """Replace each of the model's Linear layers the quantizer quantizes by a QuantLinear, except those that
    keep_dense (routers); returns how many. Layers built as torch's own nn.Linear (MLA's kv_b_proj, whose weight
    attention reads directly) are not ours and stay."""
    replaced = 0
    for path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear) and not child.keep_dense:
                param = f"{path}.{name}.weight" if path else f"{name}.weight"
                weight = quantizer.weight_for(param, child.weight.data)
                if weight is not None:
                    quantized = QuantLinear.of(child, weight)
                    # what others hooked on the layer (tensor parallelism's gather of the head's logits) stays on it
                    quantized._forward_hooks.update(child._forward_hooks)
                    setattr(parent, name, quantized)
                    replaced += 1
    return replaced

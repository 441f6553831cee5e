"""Experts quantized at load (quant/), swapped in for GroupedExperts by the experts pass (experts/runtime.py).

- `TiledExperts` (experts/cpu.py) on QuantTiles: our CPU kernel on the 8- or 4-bit tiles: a decode step reads its
  experts' integers and scales, never a bf16 copy.
- `QuantGroupedExperts`: the reference path (float32 activations, CUDA, shapes the kernel does not take): each
  active expert dequantized when a step needs it, then the grouped path.
- `quant_form`: offloaded experts kept quantized (experts/store.py's ExpertForm): the store, the expert file and
  the cache's slots hold the kernel's tiles, so a cache of N bytes holds 2x (int8) or 4x (int4) the experts and
  a miss reads that much less. `checkpoint_form`: the same for a quantized checkpoint's own experts, as the kernel's
  tiles or, for the reference path, as the QuantizedWeights' tensors (`slot_experts` runs either over the slots).
"""

from __future__ import annotations

import torch

from localmoe.experts.cpu import TiledExperts, grouped_kernel_serves
from localmoe.experts.store import ExpertForm
from localmoe.layers.cpu_kernels import QuantTiles, quant_expert_tiles, quant_kernel_serves
from localmoe.layers.moe import Activation, Experts, GroupedExperts, GroupedPathExperts
from localmoe.quant.scheme import QuantScheme, Quantizer
from localmoe.quant.weight import QuantizedWeight


class QuantGroupedExperts(GroupedPathExperts):
    """GroupedExperts whose w13 and w2 are QuantizedWeights, dequantized per active expert in the activations'
    dtype; biases and activation as they were."""

    def __init__(self, w13: QuantizedWeight, w2: QuantizedWeight, activation: Activation, dtype: torch.dtype,
                 w13_bias: torch.Tensor | None, w2_bias: torch.Tensor | None) -> None:
        super().__init__()
        self.num_experts = w13.packed.shape[0]
        self.activation = activation
        self.dtype = dtype
        self.w13_bias, self.w2_bias = w13_bias, w2_bias
        self.bits = {"w13": w13.bits, "w2": w2.bits}
        self.float8 = w13.float8
        for name, weight in (("w13", w13), ("w2", w2)):
            for part in ("packed", "scales", "zeros"):
                self.register_buffer(f"{name}_{part}", getattr(weight, part), persistent=False)

    def weights_of(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        def weight(name: str) -> torch.Tensor:
            parts = (getattr(self, f"{name}_{part}")[index] for part in ("packed", "scales", "zeros"))
            return QuantizedWeight(*parts, self.bits[name], self.float8).dequantize(self.dtype)

        return weight("w13"), weight("w2")


def quantize_experts(experts: GroupedExperts, path: str, quantizer: Quantizer) -> Experts | None:
    """`experts` (module `path`) quantized: on the kernel where it serves them, else the reference path; None where
    the quantizer keeps either weight dense."""
    w13, w2 = (quantizer.weight_for(f"{path}.{name}", getattr(experts, name).data) for name in ("w13", "w2"))
    if w13 is None or w2 is None or w13.float8 != w2.float8:
        return None
    if grouped_kernel_serves(experts) and quant_kernel_serves(w13) and quant_kernel_serves(w2):
        return TiledExperts(*quant_expert_tiles(w13, w2))
    return QuantGroupedExperts(w13, w2, experts.activation, experts.w13.dtype, experts.w13_bias, experts.w2_bias)


def quant_form(shapes: dict[str, tuple[int, ...]], scheme: QuantScheme) -> ExpertForm:
    """Experts kept as the quantized kernel's tiles (`shapes`: one expert's w13 and w2 in the checkpoint)."""
    tensors = {}
    for name, (rows, columns) in shapes.items():
        group = scheme.group_for(columns) or columns
        if group % 16 or columns % 16:
            raise ValueError(f"quantization {scheme.name!r}: the kernel takes experts whose rows split into groups "
                             f"of a multiple of 16 columns, not {columns}")
        tensors[f"{name}_q"] = ((rows, columns * scheme.bits // 8), torch.uint8)
        tensors[f"{name}_scales"] = tensors[f"{name}_zeros"] = ((columns // group, rows), torch.float32)
    name = f"quantized:{'fp8' if scheme.float8 else scheme.bits}:{scheme.group_size}:" \
           f"{'sym' if scheme.symmetric else 'asym'}"
    return ExpertForm(name, tensors, lambda w13, w2: _tile_tensors(scheme.quantize(w13), scheme.quantize(w2)))


def checkpoint_form(w13: QuantizedWeight, w2: QuantizedWeight, kernel: bool) -> ExpertForm:
    """Experts kept as a quantized checkpoint has them (w13 and w2: one expert's, for the shapes): the kernel's tiles
    where it serves them, else the QuantizedWeights' own tensors (packed, scales, zeros) for the reference path."""
    if w13.float8 != w2.float8:
        raise ValueError(f"expert offloading keeps an expert's w13 and w2 both integers or both fp8, not "
                         f"{_kind(w13)} and {_kind(w2)}")

    def make(w13: QuantizedWeight, w2: QuantizedWeight) -> dict[str, torch.Tensor]:
        if kernel:
            return _tile_tensors(w13, w2)
        return {f"{name}_{part}": getattr(weight, part) for name, weight in (("w13", w13), ("w2", w2))
                for part in ("packed", "scales", "zeros")}
    tensors = {kind: (tuple(t.shape), t.dtype) for kind, t in make(w13, w2).items()}
    name = f"checkpoint:{'tiles' if kernel else 'packed'}:{_kind(w13)}:{w13.group_size}:{_kind(w2)}:{w2.group_size}"
    return ExpertForm(name, tensors, make)


def slot_experts(slots: dict[str, torch.Tensor], bits: tuple[int, int], float8: bool, kernel: bool,
                 activation: Activation, dtype: torch.dtype) -> Experts:
    """The experts module over a cache's slots in quant_form or checkpoint_form (kernel: its tiles); `bits`: w13's
    and w2's."""
    if kernel:
        return TiledExperts(*(QuantTiles(*(slots[f"{name}_{part}"] for part in QuantTiles.PARTS), width, float8)
                              for name, width in zip(("w13", "w2"), bits)))
    w13, w2 = (QuantizedWeight(*(slots[f"{name}_{part}"] for part in ("packed", "scales", "zeros")), width, float8)
               for name, width in zip(("w13", "w2"), bits))
    return QuantGroupedExperts(w13, w2, activation, dtype, None, None)


def _tile_tensors(w13: QuantizedWeight, w2: QuantizedWeight) -> dict[str, torch.Tensor]:
    tiles = quant_expert_tiles(w13, w2)
    return {f"{name}_{part}": tensor for name, weight in zip(("w13", "w2"), tiles)
            for part, tensor in zip(QuantTiles.PARTS, weight.tensors())}


def _kind(weight: QuantizedWeight) -> str:
    return "fp8" if weight.float8 else f"int{weight.bits}"

"""Quantization asked for by name (`--quantization`, vLLM's names) and what each name means here.

Weight-only schemes quantized at load from a bf16/fp32 checkpoint:
- int8: 8 bits, one symmetric scale per output row (vLLM's experts_int8 is the same for the experts alone);
- int4: 4 bits, a scale and zero point per row and group of 128 columns (asymmetric, as AWQ and GPTQ store them);
- fp8: float8 e4m3 with one scale per output row (vLLM's dynamic fp8; the activations stay bf16 here: the CPU
  kernels multiply in bf16, and vLLM's per-token fp8 activations would only lose precision). On an fp8 checkpoint
  the same name reads the checkpoint's own fp8 weights instead.
Dense linear layers and experts are quantized alike unless `experts_only`. The output head keeps 8 bits under int4
(llama.cpp's Q4_K_M keeps it at 6): it is one matrix, read once a step, and the most sensitive one.

The names of checkpoint formats (awq, gptq, compressed-tensors, fp8, ...; quant/formats.py) ask for no rounding
here: the checkpoint's own integers are served (models/quantized_checkpoint.py), and the loader checks that the
checkpoint is what the name says.

Both kinds answer the quantization pass's one question (`Quantizer.weight_for`): this parameter, quantized, or
None to keep it dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from localmoe.quant.weight import QuantizedWeight, Span, quantize, quantize_fp8

LOAD_TIME = ("int8", "int4", "experts_int8", "fp8")
# vLLM's names for quantized checkpoints (quant/formats.py READERS checks each against the checkpoint)
CHECKPOINT_FORMATS = ("awq", "awq_marlin", "gptq", "gptq_marlin", "moe_wna16", "compressed-tensors", "fp8",
                      "fbgemm_fp8", "gguf")
NONE = (None, "", "none")


class Quantizer(Protocol):
    experts_only: bool  # the dense linear layers stay as they are

    def weight_for(self, param: str, dense: torch.Tensor) -> QuantizedWeight | None:
        """Model parameter `param` (its dense values) quantized, or None to keep it dense."""


@dataclass(frozen=True)
class QuantScheme:
    name: str
    bits: int
    group_size: int | None  # columns per scale; None: the whole row
    symmetric: bool
    experts_only: bool = False
    float8: bool = False  # e4m3 values with a scale (bits 8, symmetric), not integers

    def for_head(self) -> "QuantScheme":
        return self if self.bits == 8 else INT8

    def group_for(self, columns: int) -> int | None:
        """The group size for a weight of `columns` columns: group_size where it divides them, else the largest
        multiple of 16 below it that does (what the kernels take), else the whole row."""
        if self.group_size is None or columns % self.group_size == 0:
            return self.group_size
        return next((g for g in range(self.group_size - 16, 0, -16) if columns % g == 0), None)

    def quantize(self, weight: torch.Tensor, columns: int | None = None, span: Span | None = None) -> QuantizedWeight:
        """`weight` quantized in the groups a row of `columns` (default: its own) takes; `span`: their ranges where
        they reach past `weight`'s columns (quant/weight.py)."""
        group = self.group_for(columns or weight.shape[-1])
        if self.float8:
            return quantize_fp8(weight, group, span)
        return quantize(weight, self.bits, group, self.symmetric, span)

    def for_param(self, param: str) -> "QuantScheme":
        """The scheme that quantizes `param`: the head's under int4."""
        return self.for_head() if param == "lm_head.weight" else self

    def weight_for(self, param: str, dense: torch.Tensor) -> QuantizedWeight:
        return self.for_param(param).quantize(dense)


INT8 = QuantScheme("int8", 8, None, True)
INT4 = QuantScheme("int4", 4, 128, False)


def quant_scheme(name: str | None, experts_only: bool = False) -> QuantScheme | None:
    """The scheme `name` asks for at load (None: none, or a checkpoint format's own; fp8 is both: the loader reads an
    fp8 checkpoint's own weights before this applies); ValueError for a name we do not serve, naming it."""
    if name == "fp8":
        return QuantScheme("fp8", 8, None, True, experts_only, float8=True)
    if name in NONE or name in CHECKPOINT_FORMATS:
        if experts_only:
            raise ValueError("quantize_experts_only needs a quantization at load (int8, int4 or fp8)")
        return None
    if name == "experts_int8":
        return QuantScheme("experts_int8", 8, None, True, experts_only=True)
    if name in ("int8", "int4"):
        base = INT8 if name == "int8" else INT4
        return QuantScheme(name, base.bits, base.group_size, base.symmetric, experts_only)
    raise ValueError(f"quantization {name!r} is not one of {', '.join(LOAD_TIME + CHECKPOINT_FORMATS)}")

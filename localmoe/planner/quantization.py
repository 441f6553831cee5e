"""Weight bytes under a quantization, by kind of weight, for `localmoe plan --quantization NAME` (the names
`serve --quantization` takes, quant/scheme.py).

Quantizations store the linear layers' integers plus their scales (and zero points), and leave the embedding,
the routers and the norms in the checkpoint's dtype; the output head depends on the scheme. Per parameter:
- int8 (ours): 1 byte, and a float32 scale and zero point per row; int4 (ours): half a byte and a float32 scale
  and zero point per 128 columns, the head in int8; experts_int8: the routed experts alone in int8;
- awq, gptq, compressed-tensors (as deployed: 4 bits in groups of 128 with an fp16 scale and a 4-bit zero point;
  the head unquantized): half a byte and 2.5 bytes per 128;
- fp8 (DeepSeek-V3's block scales): 1 byte and a float32 scale per 128 x 128 block; the head unquantized.
"""

from __future__ import annotations

from dataclasses import dataclass

from localmoe.planner.params import ParamCounts
from localmoe.planner.shape import PlanError

QUANTIZATIONS = ("none", "int8", "int4", "experts_int8", "awq", "gptq", "compressed-tensors", "fp8")


@dataclass(frozen=True)
class WeightBytes:
    """Bytes per parameter of each kind of weight."""

    linear: float  # attention projections, dense MLPs, shared experts
    expert: float  # routed experts
    head: float
    other: float  # embedding, routers, norms

    def of(self, params: ParamCounts) -> int:
        linear = params.attention + params.dense_mlp + params.shared_experts
        return int(linear * self.linear + params.routed_experts * self.expert + params.lm_head * self.head
                   + (params.embedding + params.routers + params.norms) * self.other)

    def of_non_expert(self, params: ParamCounts) -> int:
        return self.of(params) - int(params.routed_experts * self.expert)


def weight_bytes(quantization: str, dtype_bytes: int, row: int) -> WeightBytes:
    """Bytes per parameter under `quantization` for a checkpoint of `dtype_bytes` a parameter whose rows are about
    `row` columns (the hidden size: it sets the per-row scales' share)."""
    int8 = 1 + 8 / row
    per_kind = {
        "none": (dtype_bytes, dtype_bytes, dtype_bytes),
        "int8": (int8, int8, int8),
        "int4": (0.5 + 8 / 128, 0.5 + 8 / 128, int8),
        "experts_int8": (dtype_bytes, int8, dtype_bytes),
        "awq": (0.5 + 2.5 / 128, 0.5 + 2.5 / 128, dtype_bytes),
        "fp8": (1 + 4 / 128**2, 1 + 4 / 128**2, dtype_bytes),
    }
    per_kind["gptq"] = per_kind["compressed-tensors"] = per_kind["awq"]
    if quantization not in per_kind:
        raise PlanError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)}")
    return WeightBytes(*per_kind[quantization], other=dtype_bytes)

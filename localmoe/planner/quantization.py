"""Weight bytes under a quantization, by kind of weight, for `localmoe plan --quantization NAME` (the names
`serve --quantization` takes, quant/scheme.py), counted as the weights are held while serving.

A quantized weight [N, K] is held as QuantizedWeight holds it (quant/weight.py), whatever the checkpoint stored:
`bits` a value and a float32 scale and zero point per row and group of columns. So an AWQ checkpoint's fp16 scales
and 4-bit zero points (2.5 bytes a group of 128 on disk) take 8 bytes a group in memory, and DeepSeek-V3's float32
scale per 128 x 128 block becomes one per row and 128 columns. The embedding, the routers and the norms stay in the
checkpoint's dtype.

What is quantized, and how:
- a quantized checkpoint (config.json's quantization_config: awq, gptq, compressed-tensors, fp8): its own bits and
  groups, whatever --quantization says (which must agree with it, as serve checks); its head as it left it;
  GPTQ with desc_act is dequantized at load (groups not in runs of columns), so it counts dense;
- int8, int4, experts_int8, fp8 at load: their scheme (int4's head in int8; experts_int8 the routed experts alone);
- awq, gptq, compressed-tensors, fp8 on a checkpoint without quantization_config (what its quantized release would
  take): as deployed, 4 bits in groups of 128, or float8 in DeepSeek-V3's blocks of 128; the head unquantized.
The routed experts are counted matrix by matrix, with the groups the loader gives them (QuantScheme.group_for);
the other linear layers per parameter, as rows of the hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from localmoe.planner.params import ParamCounts
from localmoe.planner.shape import MoeShape, PlanError
from localmoe.quant.formats import checkpoint_format
from localmoe.quant.scheme import LOAD_TIME, QuantScheme, quant_scheme

CHECKPOINT_NAMES = ("awq", "gptq", "compressed-tensors", "fp8")
QUANTIZATIONS = ("none", *LOAD_TIME[:3], *CHECKPOINT_NAMES)  # the table a plan reports (fp8: the checkpoint)
AS_DEPLOYED = {"awq": QuantScheme("awq", 4, 128, False), "gptq": QuantScheme("gptq", 4, 128, False),
               "compressed-tensors": QuantScheme("compressed-tensors", 4, 128, False),
               "fp8": QuantScheme("fp8", 8, 128, True, float8=True)}
SCALE_AND_ZERO_BYTES = 8  # float32 each, per row and group


@dataclass(frozen=True)
class Quantization:
    """What a plan quantizes, and how: a scheme per kind of weight, None where it stays in the checkpoint's dtype."""

    name: str
    linear: QuantScheme | None  # attention projections, dense MLPs, shared experts
    expert: QuantScheme | None  # routed experts
    head: QuantScheme | None


def quantization_of(name: str, quantization_config: dict[str, Any] | None = None) -> Quantization:
    """`--quantization name` (auto or none: the checkpoint's own, if any) on a checkpoint whose config.json holds
    `quantization_config`."""
    if quantization_config:
        try:
            method = checkpoint_format(quantization_config, None if name == "auto" else name).method
        except ValueError as e:
            raise PlanError(str(e)) from None
        scheme = _checkpoint_scheme(method, quantization_config)
        head = scheme if method == "gptq" and quantization_config.get("lm_head") else None
        return Quantization(method, scheme, scheme, head)
    if name in ("none", "auto"):
        return Quantization("none", None, None, None)
    if name in AS_DEPLOYED:
        scheme = AS_DEPLOYED[name]
        return Quantization(name, scheme, scheme, None)
    try:
        scheme = quant_scheme(name)
    except ValueError:
        raise PlanError(f"unknown quantization {name!r}; use one of {', '.join(QUANTIZATIONS)}") from None
    if scheme.experts_only:
        return Quantization(name, None, scheme, None)
    return Quantization(name, scheme, scheme, scheme.for_head())


def _checkpoint_scheme(method: str, config: dict[str, Any]) -> QuantScheme | None:
    """The bits and groups a checkpoint's quantization_config gives its weights (None: served dense)."""
    if method in ("fp8", "fbgemm_fp8"):
        block = config.get("weight_block_size")
        return QuantScheme(method, 8, block[1] if block else None, True, float8=True)
    if method == "compressed-tensors":
        weights = next(group["weights"] for group in config["config_groups"].values() if group.get("weights"))
        strategy = weights.get("strategy") or "group"
        group = {"group": weights.get("group_size"), "block": (weights.get("block_structure") or [0, 0])[1]}
        return QuantScheme(method, weights.get("num_bits", 8), group.get(strategy), weights.get("symmetric", True),
                           float8=weights.get("type") == "float")
    if method == "gptq" and config.get("desc_act"):
        return None
    group = config.get("group_size", config.get("q_group_size", 128))
    return QuantScheme(method, config.get("bits", config.get("w_bit", 4)), None if group == -1 else group, False)


def served_bytes(rows: int, columns: int, scheme: QuantScheme | None, dtype_bytes: int) -> int:
    """A weight [rows, columns] as held while serving: dense in the checkpoint's dtype, or as QuantizedWeight."""
    if scheme is None:
        return rows * columns * dtype_bytes
    group = scheme.group_for(columns) or columns
    return rows * (columns * scheme.bits // 8 + SCALE_AND_ZERO_BYTES * (columns // group))


def expert_bytes(moe: MoeShape, hidden: int, scheme: QuantScheme | None, dtype_bytes: int) -> int:
    """One routed expert of one layer: w13 [2I, D] and w2 [D, I], and its biases (dense) where it has them."""
    inter = moe.intermediate_size
    biases = (2 * inter + hidden) * dtype_bytes if moe.expert_bias else 0
    return served_bytes(2 * inter, hidden, scheme, dtype_bytes) + served_bytes(hidden, inter, scheme,
                                                                               dtype_bytes) + biases


@dataclass(frozen=True)
class WeightBytes:
    """Bytes per parameter of each kind of weight, and of one routed expert exactly."""

    linear: float
    expert: int  # one routed expert of one layer
    head: float
    other: float  # embedding, routers, norms

    def of(self, params: ParamCounts) -> int:
        experts = params.routed_experts // params.expert if params.expert else 0  # over all MoE layers
        return self.of_non_expert(params) + experts * self.expert

    def of_non_expert(self, params: ParamCounts) -> int:
        linear = params.attention + params.dense_mlp + params.shared_experts
        return int(linear * self.linear + params.lm_head * self.head
                   + (params.embedding + params.routers + params.norms) * self.other)


def weight_bytes(quantization: Quantization, dtype_bytes: int, hidden: int, moe: MoeShape | None) -> WeightBytes:
    """Bytes per parameter under `quantization` for a checkpoint of `dtype_bytes` a parameter, the dense linear
    layers' rows taken as `hidden` columns (it sets the scales' share), the routed experts of `moe` exactly."""
    def per_param(scheme: QuantScheme | None) -> float:
        return served_bytes(1, hidden, scheme, dtype_bytes) / hidden

    one_expert = expert_bytes(moe, hidden, quantization.expert, dtype_bytes) if moe else 0
    return WeightBytes(per_param(quantization.linear), one_expert, per_param(quantization.head), dtype_bytes)

"""Devices, and how a model's weights and KV cache fit on them.

Each device keeps back a CUDA context (GPUs only) and a safety margin of 10% of its memory;
what is left (`usable_bytes`) holds weights and KV cache. With a tensor/expert-parallel degree
of N, weights and KV are assumed to shard evenly over N such devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from localmoe.planner.parallel import ParallelPlan, plan_parallel
from localmoe.planner.params import ParamCounts, count_params, kv_elements_per_token, kv_rows_per_token
from localmoe.planner.quantization import QUANTIZATIONS, WeightBytes, quantization_of, weight_bytes
from localmoe.planner.shape import ModelShape, PlanError

GiB = 1 << 30
MiB = 1 << 20
MARGIN_FRACTION = 0.10
CUDA_CONTEXT_BYTES = 1 * GiB
MAX_PARALLEL_DEGREE = 64
DEFAULT_MAX_MODEL_LEN = 32768

# Memory as nvidia-smi reports it.
GPUS = {"H100-80GB": 81559 * MiB, "A100-80GB": 81920 * MiB, "A100-40GB": 40960 * MiB, "L40S-48GB": 46068 * MiB}
BYTES_PER_PARAM = {"bf16": 2, "fp16": 2}  # the checkpoint's dtype; quantizations: planner/quantization.py
# KV stays in the activation dtype (bf16/fp16, also with weight-only quantization) unless fp8 (e4m3), whose rows
# keep one more byte each, their scale's exponent (layers/kv_cache_dtype.py).
KV_BYTES = {"auto": 2, "fp8": 1, "fp8_e4m3": 1}
KV_SCALE_BYTES = {"auto": 0, "fp8": 1, "fp8_e4m3": 1}


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int
    context_bytes: int

    @property
    def margin_bytes(self) -> int:
        return int(self.memory_bytes * MARGIN_FRACTION)

    @property
    def usable_bytes(self) -> int:
        return self.memory_bytes - self.context_bytes - self.margin_bytes


def parse_device(spec: str) -> Device:
    """`H100-80GB`, `A100-80GB`, `A100-40GB`, `L40S-48GB` (any case) or `cpu:GiB`."""
    if spec.lower().startswith("cpu:"):
        try:
            gib = float(spec[4:])
        except ValueError:
            gib = 0.0
        if gib <= 0:
            raise PlanError(f"cpu device needs a positive size in GiB, as in cpu:64 (got {spec!r})")
        return Device(f"cpu:{spec[4:]}", int(gib * GiB), 0)
    for name, memory in GPUS.items():
        if spec.lower() == name.lower():
            return Device(name, memory, CUDA_CONTEXT_BYTES)
    raise PlanError(f"unknown device {spec!r}; use one of {', '.join(GPUS)} or cpu:GiB")


@dataclass(frozen=True)
class Plan:
    model: str
    architecture: str
    dtype: str
    quantization: str
    kv_cache_dtype: str
    device: str
    device_memory_bytes: int
    cuda_context_bytes: int
    margin_bytes: int
    usable_bytes: int  # per device, for weights and KV
    max_model_len: int
    max_model_len_is_default: bool
    max_num_seqs: int
    params: ParamCounts
    weight_bytes: int  # in `dtype`, under `quantization`
    weight_bytes_per_quantization: dict[str, int]
    kv_attention: str  # "mla" | "standard"
    kv_bytes_per_token: int
    kv_bytes_per_sequence: int  # one max_model_len sequence
    kv_budget_bytes: int  # on one device, after weights; 0 when weights do not fit
    max_concurrent_tokens: int  # on one device
    requested_tokens: int  # max_num_seqs * max_model_len
    requested_fits: bool  # on one device
    fits_on_one_device: bool  # weights + one max_model_len sequence
    parallel_degree: int | None  # smallest power of two that fits; None past MAX_PARALLEL_DEGREE
    parallel_kv_budget_bytes: int  # over parallel_degree devices (0 when none fits)
    parallel_max_concurrent_tokens: int
    parallel_requested_fits: bool
    num_experts: int  # routed experts per MoE layer
    expert_bytes: int  # one routed expert of one layer, as it is held while serving (packed, if quantized)
    experts_per_layer_cached: int | None  # expert cache on one device; None when the model fits
    notes: list[str] = field(default_factory=list)
    layout: ParallelPlan | None = None  # the tensor/expert-parallel layout asked for, per rank


def plan_memory(shape: ModelShape, device: Device, dtype: str = "bf16", max_model_len: int | None = None,
                max_num_seqs: int = 256, kv_cache_dtype: str = "auto", quantization: str = "auto",
                quantization_config: dict[str, Any] | None = None,
                held: Callable[[ParamCounts, int], WeightBytes] | None = None, tensor_parallel_size: int = 1,
                expert_parallel: bool = False, data_parallel_size: int = 1) -> Plan:
    """Where `shape` fits on `device`: KV budget, parallel degree, or the size of an expert cache; with
    `tensor_parallel_size` > 1, memory per rank and collective bytes per token of that layout (`expert_parallel`:
    routed experts spread whole; over `data_parallel_size` replicas where that is > 1). `quantization_config`: the
    checkpoint's (config.json), whose own bits and groups its weights keep; `held`: bytes per parameter of a
    checkpoint that says them tensor by tensor (a GGUF file), from its counts and the dtype's bytes."""
    if dtype not in BYTES_PER_PARAM:
        raise PlanError(f"unknown dtype {dtype!r}; use one of {', '.join(BYTES_PER_PARAM)} (8 and 4 bits: "
                        "--quantization)")
    if kv_cache_dtype not in KV_BYTES:
        raise PlanError(f"unknown kv cache dtype {kv_cache_dtype!r}; use one of {', '.join(KV_BYTES)}")
    if max_num_seqs < 1 or (max_model_len is not None and max_model_len < 1):
        raise PlanError("max_num_seqs and max_model_len must be positive")
    notes: list[str] = []
    is_default = max_model_len is None
    if max_model_len is None:
        max_model_len = min(shape.max_position_embeddings or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)
    elif shape.max_position_embeddings and max_model_len > shape.max_position_embeddings:
        notes.append(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
                     f"{shape.max_position_embeddings}")

    params = count_params(shape)
    if held is not None:
        if quantization not in ("auto", "gguf"):
            raise PlanError(f"quantization {quantization!r}: a GGUF file is served in its own quantization")
        quantization_name, per_param = "gguf", held(params, BYTES_PER_PARAM[dtype])
    else:
        quantized = quantization_of(quantization, quantization_config)
        quantization_name = quantized.name
        per_param = weight_bytes(quantized, BYTES_PER_PARAM[dtype], shape.hidden_size, shape.moe)
    weights = per_param.of(params)
    kv_per_token = (kv_elements_per_token(shape) * KV_BYTES[kv_cache_dtype]
                    + kv_rows_per_token(shape) * KV_SCALE_BYTES[kv_cache_dtype])
    kv_per_seq = kv_per_token * max_model_len
    requested = max_num_seqs * max_model_len
    usable = device.usable_bytes

    budget = max(0, usable - weights)
    tokens = budget // kv_per_token
    degree = next((n for n in _powers_of_two() if weights + kv_per_seq <= n * usable), None)
    parallel_budget = max(0, degree * usable - weights) if degree else 0
    parallel_tokens = parallel_budget // kv_per_token

    expert_bytes = per_param.expert
    cached = None
    if degree != 1 and shape.moe and params.num_moe_layers:
        room = usable - per_param.of_non_expert(params) - kv_per_seq
        cached = min(shape.moe.num_experts, max(0, room // (expert_bytes * params.num_moe_layers)))
        if room < 0:
            notes.append("non-expert weights and one max_model_len sequence of KV alone exceed one device: "
                         "an expert cache cannot help; lower max_model_len or use a larger device")
        elif cached < params.top_k:
            notes.append(f"an expert cache of {cached} experts per layer is below top-k ({params.top_k}): "
                         "every token waits for expert copies")

    if shape.attention.num_sliding_layers:
        notes.append(f"{shape.attention.num_sliding_layers} of {shape.num_layers} layers use a "
                     f"{shape.attention.sliding_window}-token sliding window; KV counts them as full "
                     "attention (an upper bound, and what a paged cache without window eviction holds)")
    if degree and degree > 1:
        notes.append(f"parallel degree {degree} assumes weights and KV shard evenly over {degree} devices"
                     + (" (under tensor parallelism MLA's latent KV is replicated, not sharded)"
                        if shape.attention.is_mla else ""))
    layout = None
    if tensor_parallel_size > 1 or expert_parallel or data_parallel_size > 1:
        layout = plan_parallel(shape, params, per_param, tensor_parallel_size, expert_parallel,
                               BYTES_PER_PARAM[dtype], KV_BYTES[kv_cache_dtype], KV_SCALE_BYTES[kv_cache_dtype],
                               usable, max_model_len, data_parallel_size)
    return Plan(
        model=shape.name, architecture=shape.architecture, dtype=dtype, quantization=quantization_name,
        kv_cache_dtype=kv_cache_dtype,
        device=device.name, device_memory_bytes=device.memory_bytes, cuda_context_bytes=device.context_bytes,
        margin_bytes=device.margin_bytes, usable_bytes=usable,
        max_model_len=max_model_len, max_model_len_is_default=is_default, max_num_seqs=max_num_seqs,
        params=params, weight_bytes=weights,
        weight_bytes_per_quantization={quantization_name: weights} if quantization_config or held else {
            q: weight_bytes(quantization_of(q), BYTES_PER_PARAM[dtype], shape.hidden_size, shape.moe).of(params)
            for q in QUANTIZATIONS},
        kv_attention="mla" if shape.attention.is_mla else "standard",
        kv_bytes_per_token=kv_per_token, kv_bytes_per_sequence=kv_per_seq,
        kv_budget_bytes=budget, max_concurrent_tokens=tokens,
        requested_tokens=requested, requested_fits=requested <= tokens, fits_on_one_device=degree == 1,
        parallel_degree=degree, parallel_kv_budget_bytes=parallel_budget,
        parallel_max_concurrent_tokens=parallel_tokens, parallel_requested_fits=bool(degree) and
        requested <= parallel_tokens,
        num_experts=shape.moe.num_experts if shape.moe else 0, expert_bytes=expert_bytes,
        experts_per_layer_cached=cached, notes=notes, layout=layout,
    )


def _powers_of_two() -> list[int]:
    return [1 << i for i in range(int(math.log2(MAX_PARALLEL_DEGREE)) + 1)]

"""What rank 0 settles before it starts a tensor/expert-parallel engine's workers (and each data-parallel rank with
expert parallelism before it joins the others): can each rank hold its share
(the planner's numbers, planner/parallel.py, so a refusal says what `localmoe plan` would), and which rank holds
each routed expert (the placement every rank then applies: the routing counts are read once, here).
With expert offloading each rank holds its cache of its own experts where it would hold them all; a store on disk,
or on CUDA in host memory, is not in the rank's budget.

On CUDA each rank has a device of its own: gpu_memory_utilization of it must hold the rank's weights and its KV
cache (kv_cache_memory, else one max_model_len sequence). On CPU the ranks share this machine's memory: all N of
them must fit in what this process may still use.
"""

from __future__ import annotations

import torch

from localmoe.config import ConfigError, EngineConfig
from localmoe.distributed.expert_placement import load_routing_counts, model_placement
from localmoe.experts.memory_budget import memory_left
from localmoe.models.loader import resolve_dtype
from localmoe.planner.params import count_params
from localmoe.planner.parallel import ParallelPlan, plan_parallel
from localmoe.planner.quantization import quantization_of, weight_bytes
from localmoe.planner.shape import PlanError, model_shape


def layout_plan(config: EngineConfig, hf_config: dict, device: torch.device, usable_bytes: int,
                max_model_len: int) -> ParallelPlan:
    """The planner's layout of this checkpoint under `config`'s parallelism, in the dtype it will be served in."""
    shape = model_shape(hf_config.get("_name_or_path", "checkpoint"), hf_config)
    itemsize = resolve_dtype(config.dtype, hf_config, device).itemsize
    per_param = weight_bytes(quantization_of(config.quantization or "none"), itemsize, shape.hidden_size, shape.moe)
    return plan_parallel(shape, count_params(shape), per_param, config.tensor_parallel_size,
                         config.enable_expert_parallel, itemsize, itemsize, 0, usable_bytes, max_model_len,
                         config.data_parallel_size if config.data_expert_parallel else 1)


def refuse_unfit_layout(config: EngineConfig, hf_config: dict, device: torch.device, max_model_len: int) -> None:
    """Raise ConfigError, with the planner's numbers, where the ranks cannot hold their weights and KV cache."""
    world = config.model_ranks
    if device.type == "cuda":
        usable, where = int(torch.cuda.get_device_properties(device).total_memory
                            * config.gpu_memory_utilization), "gpu_memory_utilization of each device"
    else:
        usable, where = memory_left() // world, f"1/{world} of the memory this process may use"
    try:
        plan = layout_plan(config, hf_config, device, usable, max_model_len)
    except PlanError:  # an architecture the planner does not know: the ranks' loading is the check
        return
    kv = config.kv_cache_bytes or plan.kv_bytes_per_token_per_rank * max_model_len
    need = plan.weight_bytes_per_rank + kv
    if config.offloads_experts:
        need += rank_cache_bytes(config, plan) - (0 if device.type == "cpu" and config.expert_offload_target == "host"
                                                  else plan.expert_bytes_per_rank)
    if need <= usable:
        return
    mib = 2**20
    layout = "expert parallel" if config.enable_expert_parallel else "tensor parallel"
    key = "data_parallel_size" if config.data_expert_parallel else "tensor_parallel_size"
    raise ConfigError(
        f"{key}: {world} ranks ({layout}) do not fit: each needs {need / mib:.1f} MiB, weights "
        f"{plan.weight_bytes_per_rank / mib:.1f} MiB (routed experts {plan.expert_bytes_per_rank / mib:.1f} MiB) "
        f"+ KV cache {kv / mib:.1f} MiB, and has {usable / mib:.1f} MiB ({where}); see `localmoe plan "
        f"--{key.replace('_', '-')} {world}{' --enable-expert-parallel' if config.enable_expert_parallel else ''}`. "
        f"Use {'more ranks, ' if device.type == 'cuda' else ''}a smaller kv_cache_memory or max_model_len")


def rank_cache_bytes(config: EngineConfig, plan: ParallelPlan) -> int:
    """Bytes of a rank's expert cache (expert parallelism with offloading): expert_cache_memory, or
    expert_cache_size of its experts per layer; never more than the rank's experts. The rest of its experts are in
    its store: in host memory (the same memory on CPU) or on disk."""
    if isinstance(config.expert_cache_bytes, int):
        return min(config.expert_cache_bytes, plan.expert_bytes_per_rank)
    return plan.expert_bytes_per_rank * min(config.expert_cache_size, plan.experts_per_rank) // plan.experts_per_rank


def expert_placement(config: EngineConfig, hf_config: dict) -> torch.Tensor:
    """The rank of each routed expert of each MoE layer [L, E], as `config`'s expert_placement says."""
    try:
        shape = model_shape(hf_config.get("_name_or_path", "checkpoint"), hf_config)
        if shape.moe is None:
            raise ValueError("the model has no routed experts to spread")
        counts = (load_routing_counts(config.expert_placement_stats) if config.expert_placement_stats is not None
                  else None)
        return model_placement(config.expert_placement, shape.moe.num_experts, len(shape.moe_layers),
                               config.expert_parallel_size, counts)
    except ValueError as error:
        raise ConfigError(f"expert_placement: {error}") from None

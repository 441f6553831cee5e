"""A loaded single-device model split for its rank, as the layout says: tensor parallelism (apply_tp), its routed
experts kept whole on their ranks instead under expert parallelism (apply_ep), or, for one data-parallel rank with
expert parallelism, only its experts spread, exchanging tokens with the other ranks' (dp_expert_parallel.py).
Applied from outside, as gpt-fast's apply_tp is: the model files know nothing of ranks.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from localmoe.config import ConfigError, EngineConfig
from localmoe.distributed.dp_expert_parallel import DataParallelExperts, ExpertGroup
from localmoe.distributed.expert_parallel import apply_ep
from localmoe.distributed.sharded_quantization import ShardedScheme
from localmoe.distributed.tensor_parallel import apply_tp
from localmoe.quant.scheme import QuantScheme


def shard_model(model: nn.Module, config: EngineConfig, placement: torch.Tensor | None, device: torch.device,
                expert_group: ExpertGroup | None, quant: QuantScheme | None) -> QuantScheme | None:
    """Split `model` in place for this rank; returns the quantization its shard then takes (`quant` cut to the
    shard, so that each rank's integers and scales are those one process gives the whole). ConfigError, naming the
    setting, for a model the layout cannot split."""
    if config.tensor_parallel_size > 1:
        if model.quantized_checkpoint is not None:
            raise ConfigError("tensor_parallel_size: a quantized checkpoint is not split across ranks yet; "
                              "serve its unquantized original with --quantization")
        key = "enable_expert_parallel" if placement is not None else "tensor_parallel_size"
        try:
            row_parallel = apply_tp(model, split_experts=placement is None)
            if placement is not None:
                apply_ep(model, placement, device)
        except ValueError as error:
            raise ConfigError(f"{key}: {error}") from None
        return ShardedScheme.of(quant, row_parallel) if quant is not None else None
    if expert_group is not None:
        try:
            apply_ep(model, placement, device, partial(DataParallelExperts, group=expert_group))
        except ValueError as error:
            raise ConfigError(f"enable_expert_parallel: {error}") from None
    return quant

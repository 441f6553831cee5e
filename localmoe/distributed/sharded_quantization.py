"""A quantization at load (`--quantization int8|int4|fp8`) applied to a tensor-parallel rank's shards so that the
ranks hold, between them, the very integers and scales one process would.

Shapes: N ranks, K a weight's columns in one process, K/N a row-parallel shard's.

A scheme quantizes each row in groups of columns (int4: 128; int8 and fp8: the whole row). A column-parallel shard
(q/k/v, gate/up, w13, the vocabulary's rows) holds whole rows: quantized here as in one process. A row-parallel
shard (o_proj, down projections, split experts' w2) holds K/N columns of every row: where the scheme's groups of a
K-column row fall whole within K/N columns, each rank quantizes its own groups; where a group is the whole row, its
range is taken over every rank's columns (two all-reduces, min and max, at load) and each rank rounds its columns
with that range's scale. Groups that a shard boundary would cut are refused by name. Whole experts (expert
parallelism) are whole rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from localmoe.quant.scheme import QuantScheme
from localmoe.quant.weight import QuantizedWeight, group_span


@dataclass(frozen=True)
class ShardedScheme(QuantScheme):
    row_parallel: frozenset[str] = frozenset()  # parameters split along their columns (apply_tp names them)

    @classmethod
    def of(cls, scheme: QuantScheme, row_parallel: frozenset[str]) -> "ShardedScheme":
        return cls(**asdict(scheme), row_parallel=row_parallel)

    def weight_for(self, param: str, dense: torch.Tensor) -> QuantizedWeight:
        scheme = self.for_param(param)
        if param not in self.row_parallel:
            return scheme.quantize(dense)
        world = dist.get_world_size()
        shard = dense.shape[-1]
        columns = shard * world
        group = scheme.group_for(columns)
        if group is not None:
            if shard % group:
                raise ValueError(f"quantization {self.name!r}: tensor_parallel_size {world} splits {param}'s rows of "
                                 f"{columns} columns into {shard} a rank, which cuts its groups of {group} columns; "
                                 "use fewer ranks, --enable-expert-parallel with --quantize-experts-only (whole "
                                 "experts), or int8/fp8 (a scale per whole row)")
            return scheme.quantize(dense, columns)
        low, high = group_span(dense)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        return scheme.quantize(dense, columns, (low, high))

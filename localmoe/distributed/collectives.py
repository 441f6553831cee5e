"""The per-step collectives of a tensor/expert-parallel engine, each counting the bytes it is handed.

A rank's count is the payload it passes to the collective: T * D * itemsize for an all-reduce of a [T, D]
activation, its own [R, V/N] shard for the logits' gather. That is what the planner predicts
(planner/parallel.py); a ring all-reduce then sends 2(N-1)/N of it over each rank's link, which is how the
planner turns bytes into time. Every rank hands the same payloads, so rank 0's count stands for each rank's.
Expert parallelism over data-parallel ranks (distributed/dp_expert_parallel.py) hands its all-gathers its own
padded rows and its reduce-scatters all ranks' rows: what a ring then sends over each link is (N-1)/N of the
latter and N-1 times the former.
One counter per process: a process holds one parallel engine at a time (distributed/mp_executor.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist


@dataclass
class CollectiveBytes:
    """Bytes handed to each kind of collective, and calls made, since the process started."""

    all_reduce: int = 0
    gather: int = 0
    all_gather: int = 0
    reduce_scatter: int = 0
    calls: int = 0

    @property
    def total(self) -> int:
        return self.all_reduce + self.gather + self.all_gather + self.reduce_scatter


COUNTED = CollectiveBytes()


def counted() -> CollectiveBytes:
    """The counts as they stand now (a copy)."""
    return replace(COUNTED)


def _payload(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def all_reduce(tensor: torch.Tensor) -> None:
    """Sum `tensor` over the ranks, in place."""
    COUNTED.all_reduce += _payload(tensor)
    COUNTED.calls += 1
    dist.all_reduce(tensor)


def gather(tensor: torch.Tensor, shards: list[torch.Tensor] | None, dst: int) -> None:
    """Every rank's `tensor` into `shards` on rank `dst` (None elsewhere)."""
    COUNTED.gather += _payload(tensor)
    COUNTED.calls += 1
    dist.gather(tensor, shards, dst=dst)


def all_gather(out: torch.Tensor, tensor: torch.Tensor) -> None:
    """Every rank's `tensor` into `out` (rank order along dimension 0)."""
    COUNTED.all_gather += _payload(tensor)
    COUNTED.calls += 1
    dist.all_gather_single(out, tensor)


def reduce_scatter(out: torch.Tensor, tensor: torch.Tensor) -> None:
    """`tensor` summed over the ranks; `out` gets this rank's 1/N of it along dimension 0."""
    COUNTED.reduce_scatter += _payload(tensor)
    COUNTED.calls += 1
    dist.reduce_scatter_single(out, tensor)


@dataclass
class CollectiveStats:
    """What the steps' collectives moved, as the runner of rank 0 observes it step by step (/v1/stats/experts)."""

    steps: int = 0
    tokens: int = 0  # tokens computed: each went through every all-reduce
    sampled: int = 0  # rows whose logits were gathered
    padded_rows: int = 0  # data-parallel expert parallelism: rows each MoE layer exchanged (the step's most tokens)
    all_reduce_bytes: int = 0
    gather_bytes: int = 0
    all_gather_bytes: int = 0
    reduce_scatter_bytes: int = 0
    last_step_bytes: int = 0
    last_step_tokens: int = 0

    def observe(self, before: CollectiveBytes, tokens: int, sampled: int, padded_rows: int = 0) -> None:
        """Account one step: the counts now less `before`, taken as the step began."""
        moved = {name: getattr(COUNTED, name) - getattr(before, name)
                 for name in ("all_reduce", "gather", "all_gather", "reduce_scatter")}
        self.steps += 1
        self.tokens += tokens
        self.sampled += sampled
        self.padded_rows += padded_rows
        for name, count in moved.items():
            setattr(self, f"{name}_bytes", getattr(self, f"{name}_bytes") + count)
        self.last_step_bytes, self.last_step_tokens = sum(moved.values()), tokens

    def summary(self) -> dict[str, int | float]:
        total = self.all_reduce_bytes + self.gather_bytes + self.all_gather_bytes + self.reduce_scatter_bytes
        per_token = {f"{name}_bytes_per_token": getattr(self, f"{name}_bytes") / self.tokens if self.tokens else 0.0
                     for name in ("all_reduce", "all_gather", "reduce_scatter")}
        return {"steps": self.steps, "tokens": self.tokens, "sampled_rows": self.sampled,
                "padded_rows": self.padded_rows,
                "all_reduce_bytes": self.all_reduce_bytes, "gather_bytes": self.gather_bytes,
                "all_gather_bytes": self.all_gather_bytes, "reduce_scatter_bytes": self.reduce_scatter_bytes,
                "bytes_per_token": total / self.tokens if self.tokens else 0.0, **per_token,
                "gather_bytes_per_sampled_row": self.gather_bytes / self.sampled if self.sampled else 0.0,
                "last_step_bytes": self.last_step_bytes, "last_step_tokens": self.last_step_tokens}

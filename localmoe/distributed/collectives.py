"""The per-step collectives of a tensor/expert-parallel engine, each counting the bytes it is handed.

A rank's count is the payload it passes to the collective: T * D * itemsize for an all-reduce of a [T, D]
activation, its own [R, V/N] shard for the logits' gather. That is what the planner predicts
(planner/parallel.py); a ring all-reduce then sends 2(N-1)/N of it over each rank's link, which is how the
planner turns bytes into time. Every rank hands the same payloads, so rank 0's count stands for each rank's.
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
    calls: int = 0

    @property
    def total(self) -> int:
        return self.all_reduce + self.gather


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


@dataclass
class CollectiveStats:
    """What the steps' collectives moved, as the runner of rank 0 observes it step by step (/v1/stats/experts)."""

    steps: int = 0
    tokens: int = 0  # tokens computed: each went through every all-reduce
    sampled: int = 0  # rows whose logits were gathered
    all_reduce_bytes: int = 0
    gather_bytes: int = 0
    last_step_bytes: int = 0
    last_step_tokens: int = 0

    def observe(self, before: CollectiveBytes, tokens: int, sampled: int) -> None:
        """Account one step: the counts now less `before`, taken as the step began."""
        all_reduce, gathered = COUNTED.all_reduce - before.all_reduce, COUNTED.gather - before.gather
        self.steps += 1
        self.tokens += tokens
        self.sampled += sampled
        self.all_reduce_bytes += all_reduce
        self.gather_bytes += gathered
        self.last_step_bytes, self.last_step_tokens = all_reduce + gathered, tokens

    def summary(self) -> dict[str, int | float]:
        total = self.all_reduce_bytes + self.gather_bytes
        return {"steps": self.steps, "tokens": self.tokens, "sampled_rows": self.sampled,
                "all_reduce_bytes": self.all_reduce_bytes, "gather_bytes": self.gather_bytes,
                "bytes_per_token": total / self.tokens if self.tokens else 0.0,
                "all_reduce_bytes_per_token": self.all_reduce_bytes / self.tokens if self.tokens else 0.0,
                "gather_bytes_per_sampled_row": self.gather_bytes / self.sampled if self.sampled else 0.0,
                "last_step_bytes": self.last_step_bytes, "last_step_tokens": self.last_step_tokens}

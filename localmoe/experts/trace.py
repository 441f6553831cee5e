"""Routing traces: which experts every computed token chose in every MoE layer, written as JSON lines.

Off by default (`routing_trace: FILE` / `--routing-trace FILE`). One line per sequence per engine
step: {"request_id", "index", "start", "tokens": [T], "experts": [layer][T][k]}, so a trace from a
trained model gives the expert-offloading work realistic routing to replay.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from localmoe.engine.scheduler import ScheduledBatch
from localmoe.layers.moe import SparseMoE


class RoutingTrace:
    def __init__(self, path: str | Path, moe_layers: list[SparseMoE]) -> None:
        self.layers = moe_layers
        for layer in moe_layers:
            layer.record_routing = True
        self.file = open(path, "a", encoding="utf-8")

    def write(self, batch: ScheduledBatch) -> None:
        """Call after the forward pass, before the sequences' computed counts advance."""
        experts = torch.stack([layer.last_expert_ids for layer in self.layers]).cpu()  # [L, T, k]
        offset = 0
        for seq, n in zip(batch.seqs, batch.num_tokens):
            start = seq.num_computed_tokens
            record = {"request_id": seq.request.request_id, "index": seq.index, "start": start,
                      "tokens": seq.token_ids[start:start + n], "experts": experts[:, offset:offset + n].tolist()}
            self.file.write(json.dumps(record, separators=(",", ":")) + "\n")
            offset += n
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_trace(path: str | Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)

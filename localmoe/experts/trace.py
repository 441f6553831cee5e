"""Routing traces: which experts every computed token chose in every MoE layer, written as JSON lines.

Off by default (`routing_trace: FILE` / `--routing-trace FILE`). One line per sequence per engine
step: {"request_id", "index", "start", "tokens": [T], "experts": [layer][T][k]}, so a trace from a
trained model gives the expert-offloading work realistic routing to replay.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from localmoe.layers.moe import SparseMoE


@dataclass(frozen=True)
class TracedTokens:
    """One sequence's share of a step: `tokens` computed from position `start`."""

    request_id: str
    index: int  # the sequence's index among its request's n
    start: int
    tokens: list[int]


class RoutingTrace:
    def __init__(self, path: str | Path, blocks: list[SparseMoE]) -> None:
        if not all(moe.token_choice for moe in blocks):
            mixing = next(moe for moe in blocks if not moe.token_choice)
            raise ValueError(f"routing_trace: a routing trace records token-choice routing, not that of "
                             f"{type(mixing).__name__} ({getattr(mixing, 'routing', '')})")
        self.file = open(path, "a", encoding="utf-8")

    def write(self, experts: torch.Tensor, pieces: list[TracedTokens]) -> None:
        """One line per piece; `experts` [L, T, k] are the step's choices, the pieces' tokens in order."""
        offset = 0
        for piece in pieces:
            n = len(piece.tokens)
            record = {"request_id": piece.request_id, "index": piece.index, "start": piece.start,
                      "tokens": piece.tokens, "experts": experts[:, offset:offset + n].tolist()}
            self.file.write(json.dumps(record, separators=(",", ":")) + "\n")
            offset += n
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_trace(path: str | Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)

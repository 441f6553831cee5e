"""A step's flat batch seen as its sequences' runs of tokens.

Token-mixing routers (expert choice, soft MoE) and capacity limits compare a token with the other tokens of
its own sequence in the step (a prompt chunk, or one decoded token), never with another request's: a
request's output must not depend on what else is batched with it. They work on padded per-sequence views.

Shapes: T tokens in the step, B sequences, L the most tokens any sequence has in the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Segments:
    seq: torch.Tensor  # [T] the sequence of each token (the flat batch holds each sequence's tokens together)
    row: torch.Tensor  # [T] the token's place among its sequence's tokens in this step
    lengths: torch.Tensor  # [B] tokens each sequence has in this step
    max_len: int  # L

    @staticmethod
    def of(token_seq: torch.Tensor) -> "Segments":
        lengths = torch.bincount(token_seq)
        starts = torch.cumsum(lengths, 0) - lengths
        row = torch.arange(token_seq.shape[0], device=token_seq.device) - starts[token_seq]
        return Segments(token_seq, row, lengths, int(lengths.max()))

    def pad(self, x: torch.Tensor, fill: float) -> torch.Tensor:
        """[T, ...] -> [B, L, ...], the places past a sequence's tokens set to `fill`."""
        padded = x.new_full((self.lengths.shape[0], self.max_len, *x.shape[1:]), fill)
        padded[self.seq, self.row] = x
        return padded

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> [T, ...]."""
        return padded[self.seq, self.row]

"""Projections of the same input merged into one matmul (q/k/v, gate/up).

Checkpoints store each projection as its own tensor; the loader writes each into its rows of the
merged weight, so a step runs one large matmul instead of two or three small ones.
"""

from __future__ import annotations

from itertools import accumulate

from torch import nn


class MergedLinear(nn.Linear):
    def __init__(self, in_features: int, out_sizes: dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(out_sizes.values()), bias=bias)
        self.sizes = list(out_sizes.values())
        ends = list(accumulate(self.sizes))
        # checkpoint projection name -> its rows in the merged weight
        self.pieces = {name: slice(end - size, end) for (name, size), end in zip(out_sizes.items(), ends)}

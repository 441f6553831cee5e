"""Rotary position embedding (Su et al. 2021), half-split layout as in Llama / Mixtral checkpoints."""

from __future__ import annotations

from functools import lru_cache

import torch


class RotaryEmbedding:
    """Holds cos/sin tables for positions [0, max_positions); not a module: kept in float32 whatever the model dtype.

    Every layer of a model rotates by the same positions in a step, so the layers share one instance
    (`rotary_embedding`) and the step's rows of the tables are gathered once, by the first layer."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device="cpu"), inv_freq)
        self.cos = torch.cat([freqs, freqs], dim=-1).cos()
        # rotate_half(x) * sin == roll(x, D/2) * [-sin, sin] in the half-split layout
        self.signed_sin = torch.cat([-freqs.sin(), freqs.sin()], dim=-1)
        self._step: tuple[torch.Tensor, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def __call__(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, D] (query and key heads together) by each token's position [T]."""
        if self._step is None or self._step[0] is not positions or self._step[1] != x.dtype:
            if self.cos.device != positions.device:
                self.cos, self.signed_sin = self.cos.to(positions.device), self.signed_sin.to(positions.device)
            self._step = (positions, x.dtype, self.cos[positions].unsqueeze(1).to(x.dtype),
                          self.signed_sin[positions].unsqueeze(1).to(x.dtype))
        _, _, cos, signed_sin = self._step
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


@lru_cache(maxsize=None)
def rotary_embedding(head_dim: int, max_positions: int, theta: float) -> RotaryEmbedding:
    return RotaryEmbedding(head_dim, max_positions, theta)


def rope_theta(hf_config: dict) -> float:
    """rope_theta lives at the top level (transformers 4) or in rope_parameters (transformers 5)."""
    params = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope scaling type {rope_type!r} is not supported yet (supported: default)")
    return float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))

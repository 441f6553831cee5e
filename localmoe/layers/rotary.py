"""Rotary position embedding (Su et al. 2021), half-split layout as in Llama / Mixtral checkpoints."""

from __future__ import annotations

import torch


class RotaryEmbedding:
    """Holds cos/sin tables for positions [0, max_positions); not a module: kept in float32 whatever the model dtype."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device="cpu"), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()

    def __call__(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, D] (query and key heads together) by each token's position [T]."""
        if self.cos.device != positions.device:
            self.cos, self.sin = self.cos.to(positions.device), self.sin.to(positions.device)
        cos = self.cos[positions].unsqueeze(1).to(x.dtype)
        sin = self.sin[positions].unsqueeze(1).to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rope_theta(hf_config: dict) -> float:
    """rope_theta lives at the top level (transformers 4) or in rope_parameters (transformers 5)."""
    params = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope scaling type {rope_type!r} is not supported yet (supported: default)")
    return float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))

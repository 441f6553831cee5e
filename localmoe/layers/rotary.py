"""Rotary position embedding (Su et al. 2021), plain or YaRN-scaled (Peng et al. 2023).

Checkpoints rotate either half-split pairs (x[i], x[i + D/2]) (Llama, Mixtral, Qwen, gpt-oss) or adjacent
pairs (x[2i], x[2i+1]) (DeepSeek). Adjacent pairs are rotated by first gathering them into the half-split
order: queries and keys are permuted alike, so their dot products, all attention ever reads, are unchanged.
"""

from __future__ import annotations

import json
import math

import torch

from localmoe.layers import cpu_kernels


def rope_parameters(hf_config: dict) -> dict:
    """rope_theta and scaling live at the top level (transformers 4) or in rope_parameters (transformers 5)."""
    params = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", hf_config.get("rope_theta", 10000.0))
    return params


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction for a context stretched `factor` times."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(dim: int, params: dict, max_positions: int) -> tuple[torch.Tensor, float]:
    """Frequencies that rotate fewer than beta_slow times over the original context are interpolated (divided
    by `factor`), those rotating more than beta_fast times are kept, with a linear ramp between; cos and sin are
    scaled by the attention factor."""
    base, original = float(params["rope_theta"]), params["original_max_position_embeddings"]
    factor = params.get("factor") or max_positions / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else yarn_mscale(factor))

    def dim_of(rotations: float) -> float:  # the pair index that turns `rotations` times over the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(params.get("beta_fast") or 32), dim_of(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp), float(attention_factor)


def inverse_frequencies(dim: int, params: dict, max_positions: int) -> tuple[torch.Tensor, float]:
    """Per-pair rotation speeds and the factor cos/sin are scaled by."""
    rope_type = params["rope_type"]
    if rope_type == "yarn":
        return _yarn(dim, params, max_positions)
    if rope_type != "default":
        raise ValueError(f"rope scaling type {rope_type!r} is not supported yet (supported: default, yarn)")
    theta = float(params["rope_theta"])
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim), 1.0


class RotaryEmbedding:
    """Holds cos/sin tables for positions [0, max_positions); not a module: kept in float32 whatever the model dtype.

    Every layer of a model rotates by the same positions in a step, so the layers share one instance
    (`rotary_embedding`) and the step's rows of the tables are gathered once, by the first layer."""

    def __init__(self, dim: int, max_positions: int, params: dict, interleaved: bool = False) -> None:
        inv_freq, attention_factor = inverse_frequencies(dim, params, max_positions)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        cos, sin = freqs.cos() * attention_factor, freqs.sin() * attention_factor
        self.cos = torch.cat([cos, cos], dim=-1)
        # rotate_half(x) * sin == roll(x, D/2) * [-sin, sin] in the half-split layout
        self.signed_sin = torch.cat([-sin, sin], dim=-1)
        self.interleaved = interleaved
        self._step: tuple[torch.Tensor, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def __call__(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, D] (query and key heads together) by each token's position [T]."""
        if self._step is None or self._step[0] is not positions or self._step[1] != x.dtype:
            if self.cos.device != positions.device:
                self.cos, self.signed_sin = self.cos.to(positions.device), self.signed_sin.to(positions.device)
            self._step = (positions, x.dtype, self.cos[positions].to(x.dtype), self.signed_sin[positions].to(x.dtype))
        _, _, cos, signed_sin = self._step  # [T, D]
        if self.interleaved:  # adjacent pairs -> half-split order
            x = x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
        if x.dim() == 3 and x.stride(-1) == 1 and not torch.is_grad_enabled() and cpu_kernels.runs_here(x):
            return cpu_kernels.kernels().rotary(x, cos, signed_sin)  # rotary_cpu.cpp: one call
        cos, signed_sin = cos.unsqueeze(-2), signed_sin.unsqueeze(-2)  # over the heads
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


_shared: dict[str, RotaryEmbedding] = {}


def rotary_embedding(dim: int, max_positions: int, params: dict, interleaved: bool = False) -> RotaryEmbedding:
    """The rotary embedding of a model (one instance per rotary shape and scaling, shared by its layers);
    `params` as rope_parameters gives them."""
    key = json.dumps([dim, max_positions, interleaved, params], sort_keys=True)
    if key not in _shared:
        _shared[key] = RotaryEmbedding(dim, max_positions, params, interleaved)
    return _shared[key]

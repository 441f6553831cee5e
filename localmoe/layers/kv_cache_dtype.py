"""What the KV cache stores (`kv_cache_dtype`): the model's dtype ("auto"), or fp8 (e4m3) with a scale per row.

A row is what one token keeps of one key or value head (D numbers), or MLA's latent entry [c, k_rope]. In fp8 it
is D e4m3 codes followed by one byte e, the exponent of the row's scale: number = code * 2^e, with
e = floor(log2(max |x| of the row)) - 7, clamped to [-64, 64].

Why a scale per row: vLLM's per-layer k_scale/v_scale is 1.0 without calibration, which saturates the rare key
channels past 448 and drops small rows into e4m3's subnormals. A row's own scale needs no calibration, is fixed
once the row is written (later tokens never rescale it), and costs one byte in D + 1 (0.8% at D = 128).

Why a power of two: x / 2^e and code * 2^e are exact in float32, so a stored code is just x's round-to-nearest-even
to e4m3 (PyTorch's cast here and the CPU kernel's conversion in paged_attention_cpu.cpp agree bit for bit), and a
read number is exact in bf16 as in float32. The row's largest |x| / 2^e lies in [128, 256), below e4m3's 448:
nothing saturates (the clamp to +-448 only matters where the exponent's clamp bites, past 2^72).

Why the exponent sits in the row (the cache's last dimension grows by one): swapping, prefix sharing and the memory
accounting then move and count fp8 blocks like any others. What it costs: the built-in model's held-out perplexity
goes from 41.46 to 41.50 in bf16 (`python -m localmoe.train.evaluate --dtype bfloat16 --kv-cache-dtype fp8`).
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
EXPONENT_BIAS = 127 + 7  # float32's exponent bias, and the 7 binades the row's maximum sits above 1
EXPONENT_RANGE = 64


def cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pool's dtype for EngineConfig.kv_cache_dtype (validated there: auto, fp8, fp8_e4m3)."""
    return model_dtype if kv_cache_dtype == "auto" else FP8


def dtype_name(dtype: torch.dtype) -> str:
    """As /v1/stats/memory reports it: fp8_e4m3 (vLLM's name), else torch's (bfloat16, float32)."""
    return "fp8_e4m3" if dtype == FP8 else str(dtype).removeprefix("torch.")


def cache_shape(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[int, ...]:
    """A layer's cache shape (its kv_cache_shape) in this dtype: fp8 rows carry their exponent byte."""
    return (*shape[:-1], shape[-1] + 1) if dtype == FP8 else tuple(shape)


def encode(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [..., D] as cache rows of `dtype`: [..., D + 1] codes and exponent in fp8, else x in that dtype."""
    if dtype != FP8:
        return x.to(dtype)
    x = x.float()
    top = x.abs().amax(dim=-1, keepdim=True)
    exponent = ((top.view(torch.int32) >> 23) - EXPONENT_BIAS).clamp(-EXPONENT_RANGE, EXPONENT_RANGE)
    codes = (x * _power_of_two(-exponent)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return torch.cat([codes, exponent.to(torch.int8).view(FP8)], dim=-1)


def decode(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cache rows back as numbers: fp8 rows [..., D + 1] as [..., D] in `dtype`; other rows as they are."""
    if rows.dtype != FP8:
        return rows
    exponent = rows[..., -1:].view(torch.int8).to(torch.int32)
    return (rows[..., :-1].float() * _power_of_two(exponent)).to(dtype)


def _power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """2^exponent in float32, built from its bits (exact, where exp2 need not be); exponent in [-126, 127]."""
    return ((exponent.to(torch.int32) + 127) << 23).view(torch.float32)

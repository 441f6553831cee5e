"""Our CPU kernel for the MoE feed-forward of decode steps (fused_moe_cpu.cpp), built on first use.

It needs bfloat16 weights, a CPU with AVX512-BF16 and a C++ compiler; it is built once into
PyTorch's extension cache (~30 s) by `torch.utils.cpp_extension`. Where any of that is missing,
`kernel()` returns None and SparseMoE runs its PyTorch path. LOCALMOE_CPU_KERNELS=0 turns it off.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused_moe_cpu.cpp")
FLAGS = ["-O3", "-march=native", "-ffast-math", "-ffp-contract=off"]


def cpu_has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@lru_cache(maxsize=None)
def kernel() -> ModuleType | None:
    """The compiled extension, or None where it cannot run here."""
    if os.environ.get("LOCALMOE_CPU_KERNELS", "1") == "0" or not cpu_has_avx512_bf16():
        return None
    from torch.utils.cpp_extension import load

    try:
        return load("localmoe_fused_moe", [str(SOURCE)], extra_cflags=FLAGS, verbose=False)
    except Exception as error:  # noqa: BLE001 -- no compiler, headers, ...: the PyTorch path serves
        log.warning("building the CPU MoE kernel failed, using the PyTorch path: %s", error)
        return None


def fused_moe(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
              w2: torch.Tensor, float_out: bool = False) -> torch.Tensor:
    """sum_k weights[t, k] * SwiGLU expert ids[t, k] applied to x[t]; see fused_moe_cpu.cpp. The sums are kept
    in float32; bf16 is returned unless `float_out` (for callers adding several partial sums)."""
    return kernel().fused_moe(x, expert_ids, weights, w13, w2, float_out)

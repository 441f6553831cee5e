"""Our CPU kernels, C++ built on first use into one extension:

- fused_moe_cpu.cpp: the MoE feed-forward of decode steps, and on the same weight-row loop `linear_bf16`, a linear
  layer at a few rows (layers/linear.py);
- paged_attention_cpu.cpp: decode attention straight over the paged KV cache;
- rms_norm_cpu.cpp: RMSNorm in one call.

They need a CPU with AVX512-BF16 and a C++ compiler; the extension is built once into PyTorch's
extension cache (~40 s) by `torch.utils.cpp_extension`. Where any of that is missing, `kernels()`
returns None and the layers run their PyTorch paths. LOCALMOE_CPU_KERNELS=0 turns them off.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = [HERE / name for name in ("cpu_kernels.cpp", "fused_moe_cpu.cpp", "paged_attention_cpu.cpp",
                                    "rms_norm_cpu.cpp")]
# -fopenmp makes at::parallel_for (an inline header) split work over PyTorch's OpenMP threads; without it the
# kernels run on one core. The libgomp linked is PyTorch's own (torch/lib is on the link path): one thread pool.
FLAGS = ["-O3", "-march=native", "-ffast-math", "-ffp-contract=off", "-fopenmp"]
LINK_FLAGS = ["-lgomp"]


def cpu_has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@lru_cache(maxsize=None)
def kernels() -> ModuleType | None:
    """The compiled extension, or None where it cannot run here."""
    if os.environ.get("LOCALMOE_CPU_KERNELS", "1") == "0" or not cpu_has_avx512_bf16():
        return None
    from torch.utils.cpp_extension import load

    try:
        return load("localmoe_cpu_kernels", [str(s) for s in SOURCES], extra_cflags=FLAGS,
                    extra_ldflags=LINK_FLAGS, verbose=False)
    except Exception as error:  # noqa: BLE001 -- no compiler, headers, ...: the PyTorch paths serve
        log.warning("building the CPU kernels failed, using the PyTorch paths: %s", error)
        return None


def runs_here(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: on CPU, bfloat16 or float32, and the kernels built."""
    return (all(t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float32) for t in tensors)
            and kernels() is not None)


def fused_moe(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
              w2: torch.Tensor, float_out: bool = False) -> torch.Tensor:
    """sum_k weights[t, k] * SwiGLU expert ids[t, k] applied to x[t]; see fused_moe_cpu.cpp. The sums are kept
    in float32; bf16 is returned unless `float_out` (for callers adding several partial sums)."""
    return kernels().fused_moe(x, expert_ids, weights, w13, w2, float_out)

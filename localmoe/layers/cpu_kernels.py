"""Our CPU kernels, C++ built on first use into one extension:

- tiled_matmul_cpu.cpp: bf16 matmuls on weights stored in tiles (`to_tiles`): the MoE feed-forward (`fused_moe`)
  and linear layers (`tiled_linear`), at every batch size;
- paged_attention_cpu.cpp: attention straight over the paged KV cache, a row per query token;
- rms_norm_cpu.cpp: RMSNorm in one call;
- rotary_cpu.cpp: the rotary embedding of a step's query and key heads in one call;
- argmax_cpu.cpp: the greedy token of each row of logits.

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
import torch.nn.functional as F

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = [HERE / name for name in ("cpu_kernels.cpp", "tiled_matmul_cpu.cpp", "paged_attention_cpu.cpp",
                                    "rms_norm_cpu.cpp", "rotary_cpu.cpp", "argmax_cpu.cpp")]
# -fopenmp makes at::parallel_for (an inline header) split work over PyTorch's OpenMP threads; without it the
# kernels run on one core. The libgomp linked is PyTorch's own (torch/lib is on the link path): one thread pool.
FLAGS = ["-O3", "-march=native", "-ffast-math", "-ffp-contract=off", "-fopenmp"]
LINK_FLAGS = ["-lgomp"]
TILE_ROWS = 64  # kTileRows in tiled_matmul_cpu.cpp


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


def to_tiles(weight: torch.Tensor) -> torch.Tensor:
    """weight [..., rows, k] (rows a multiple of 16, k even; bf16, or any 2-byte dtype) -> the same numbers in
    tiles, same shape: each run of TILE_ROWS rows (the last may be shorter) stored as [k / 2, rows, 2], the rows'
    column pairs side by side, which is what one vector load of the kernels takes (tiled_matmul_cpu.cpp)."""
    return kernels().to_tiles(weight)


def linear_tiles(weight: torch.Tensor) -> torch.Tensor:
    """A dense weight [N, K] in tiles, its rows padded with zeros to a multiple of 16."""
    return to_tiles(F.pad(weight, (0, 0, 0, -weight.shape[0] % 16)))


def expert_tiles(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked experts in the layout of fused_moe: w13 [.., 2I, D] with each 32 gate rows followed by their 32 up
    rows (so one tile holds both halves of SwiGLU for 32 units), then both in tiles."""
    inter = w13.shape[-2] // 2
    gate, up = w13[..., :inter, :], w13[..., inter:, :]
    units = TILE_ROWS // 2
    paired = [half[..., first:first + units, :] for first in range(0, inter, units) for half in (gate, up)]
    return to_tiles(torch.cat(paired, dim=-2)), to_tiles(w2)


def tiled_linear(x: torch.Tensor, tiles: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [T, K] @ weight.T for a weight in linear_tiles, in bf16."""
    return kernels().tiled_linear(x, tiles, out_features)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1) for float32 [S, V]: our kernel where it runs, else PyTorch's."""
    if logits.dim() == 2 and logits.dtype == torch.float32 and logits.shape[-1] > 0 and runs_here(logits):
        return kernels().argmax_rows(logits)
    return logits.argmax(dim=-1)


def fused_moe(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
              w2: torch.Tensor, float_out: bool = False, counts: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k weights[t, k] * SwiGLU expert ids[t, k] applied to x[t], for experts in expert_tiles; see
    tiled_matmul_cpu.cpp. The sums are kept in float32; bf16 is returned unless `float_out` (for callers adding
    several partial sums). With `counts` (int64 [E]) the pairs routed to each expert are added to it."""
    return kernels().fused_moe(x, expert_ids, weights, w13, w2, float_out, counts)

"""Our CPU kernels, C++ built on first use into one extension:

- tiled_matmul_cpu.cpp: bf16 matmuls on weights stored in tiles (`to_tiles`): the MoE feed-forward (`fused_moe`)
  and linear layers (`tiled_linear`), at every batch size; the same on 8- and 4-bit and float8 weights
  (`QuantTiles`), dequantized in registers;
- paged_attention_cpu.cpp: attention straight over the paged KV cache, a row per query token;
- rms_norm_cpu.cpp: RMSNorm in one call;
- rotary_cpu.cpp: the rotary embedding of a step's query and key heads in one call;
- argmax_cpu.cpp: the greedy token of each row of logits;
- decoder_cpu.cpp: every decoder layer of a step in one call, for models of the common MoE shapes
  (engine/fused_decoder.py).

They need a CPU with the instruction sets of KERNEL_ISA (AVX512-BF16 and VNNI among them) and a C++ compiler. Where
any of that is missing, `kernels()` returns None and the layers run their PyTorch paths. LOCALMOE_CPU_KERNELS=0
turns them off.

What they are built for is LOCALMOE_CPU_TARGET: a -march value (`native`, the default: this CPU; or a CPU model or
level such as `sapphirerapids`, `znver4`, `x86-64-v4`), or several, comma-separated, in order of preference. A
build for a target assumes the instruction sets the compiler may use for it plus KERNEL_ISA, which are added to a
target without them (so `x86-64-v3` builds AVX-512 code: it runs only where AVX512-BF16 does). The first target
whose assumptions this CPU meets is used; for the others a warning names what this CPU lacks, and where none is
met the PyTorch paths serve (`status()`, in /v1/stats/performance, says which). So an image built for one target
(deploy/docker) never runs code its node cannot (no SIGILL), and `sapphirerapids,native` builds for the node on
first start where it is another CPU model.

The first call of `kernels()` in a process builds the extension (~40 s) or loads it from our cache:
$LOCALMOE_KERNEL_CACHE, else $XDG_CACHE_HOME/localmoe/kernels (~/.cache/localmoe/kernels), a directory per digest
of what the library depends on (`cache_key`: the target among it, and for `native` the CPU), so a `-march=native`
build is never loaded on another CPU nor a stale one after an edit. Builds take an flock, which the kernel releases
when its holder dies: a build killed midway never blocks the next process (torch's own lock file would, forever).
A build does not import what it built (torch links it in, which runs only its static initializers), so an image's
build machine need not run its target. The engine calls `kernels()` at start-up so that no request waits for a
build.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import ClassVar

import torch
import torch.nn.functional as F

from localmoe.quant.weight import QuantizedWeight

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
NAME = "localmoe_cpu_kernels"  # the module's name in PYBIND11_MODULE (TORCH_EXTENSION_NAME) and its file's
SOURCES = [HERE / name for name in ("cpu_kernels.cpp", "tiled_matmul_cpu.cpp", "paged_attention_cpu.cpp",
                                    "rms_norm_cpu.cpp", "rotary_cpu.cpp", "argmax_cpu.cpp", "decoder_cpu.cpp")]
HEADERS = sorted(HERE.glob("*.h"))
# -fopenmp makes at::parallel_for (an inline header) split work over PyTorch's OpenMP threads; without it the
# kernels run on one core. The libgomp linked is PyTorch's own (torch/lib is on the link path): one thread pool.
FLAGS = ["-O3", "-march={target}", "-ffast-math", "-ffp-contract=off", "-fopenmp"]  # {target}: a Build's
TARGET_VARIABLE = "LOCALMOE_CPU_TARGET"
# The instruction sets the kernels' intrinsics use (/proc/cpuinfo's names) and the flag that enables each.
KERNEL_ISA = {"avx512f": "-mavx512f", "avx512bw": "-mavx512bw", "avx512vl": "-mavx512vl",
              "avx512_vnni": "-mavx512vnni", "avx512_bf16": "-mavx512bf16"}
# The compiler's macro for each instruction set a -march target lets it use in code it generates -> /proc/cpuinfo's
# name for it: what a build for that target assumes of the CPU it runs on.
ISA_MACROS = {
    "__SSE3__": "pni", "__SSSE3__": "ssse3", "__SSE4_1__": "sse4_1", "__SSE4_2__": "sse4_2", "__SSE4A__": "sse4a",
    "__POPCNT__": "popcnt", "__LZCNT__": "abm", "__MOVBE__": "movbe", "__BMI__": "bmi1", "__BMI2__": "bmi2",
    "__AVX__": "avx", "__AVX2__": "avx2", "__FMA__": "fma", "__FMA4__": "fma4", "__XOP__": "xop", "__F16C__": "f16c",
    "__AVXVNNI__": "avx_vnni", "__AVX512F__": "avx512f", "__AVX512CD__": "avx512cd", "__AVX512BW__": "avx512bw",
    "__AVX512DQ__": "avx512dq", "__AVX512VL__": "avx512vl", "__AVX512IFMA__": "avx512ifma",
    "__AVX512VBMI__": "avx512vbmi", "__AVX512VBMI2__": "avx512_vbmi2", "__AVX512VNNI__": "avx512_vnni",
    "__AVX512BITALG__": "avx512_bitalg", "__AVX512VPOPCNTDQ__": "avx512_vpopcntdq", "__AVX512BF16__": "avx512_bf16",
    "__AVX512FP16__": "avx512_fp16", "__AVX512ER__": "avx512er", "__AVX512PF__": "avx512pf", "__GFNI__": "gfni",
    "__VAES__": "vaes", "__VPCLMULQDQ__": "vpclmulqdq", "__AMX_TILE__": "amx_tile", "__AMX_BF16__": "amx_bf16",
    "__AMX_INT8__": "amx_int8",
}
LINK_FLAGS = ["-lgomp"]
TILE_ROWS = 64  # kTileRows in tiled_matmul_cpu.cpp
BUILT = "built"  # in a cache directory: written once the library there is complete
BUILD_LOCK = "build.lock"  # in a cache directory: flocked by the process building there
TORCH_BATON = "lock"  # torch.utils.cpp_extension's own lock file in the build directory


def cpu_has_avx512_bf16() -> bool:
    return "avx512_bf16" in cpu_flags().split()


def cpu_flags() -> str:
    """The CPU's feature flags (the first `flags` line of /proc/cpuinfo), or "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("flags")), "")
    except OSError:
        return ""


def compiler() -> str:
    """The compiler torch builds with: $CXX, else c++."""
    return os.environ.get("CXX", "c++")


def compiler_version() -> str:
    """The first line of `c++ --version`, or "" if none runs."""
    try:
        found = subprocess.run([compiler(), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return found.stdout.partition("\n")[0]


def cpu_targets() -> list[str]:
    """The -march targets of LOCALMOE_CPU_TARGET, in order of preference (default: native)."""
    return [t.strip() for t in os.environ.get(TARGET_VARIABLE, "").split(",") if t.strip()] or ["native"]


@lru_cache(maxsize=None)
def target_isa(target: str) -> frozenset[str]:
    """The instruction sets (/proc/cpuinfo's names) the compiler may use for -march=`target`, from the macros it
    defines. Raises ValueError where the compiler does not know the target; OSError where there is no compiler."""
    try:
        found = subprocess.run([compiler(), f"-march={target}", "-x", "c++", "-dM", "-E", os.devnull],
                               capture_output=True, text=True, timeout=60)
    except subprocess.SubprocessError as error:
        raise OSError(f"{compiler()} did not answer: {error}") from error
    if found.returncode != 0:
        said = found.stderr.strip().splitlines()
        raise ValueError(f"{TARGET_VARIABLE}: {compiler()} has no -march={target} ({said[0] if said else ''})")
    macros = {line.split()[1] for line in found.stdout.splitlines() if line.startswith("#define ")}
    return frozenset(flag for macro, flag in ISA_MACROS.items() if macro in macros)


@dataclass(frozen=True)
class Build:
    """The kernels built for one -march target: `assumes` is what the code may use (/proc/cpuinfo's names), the
    target's instruction sets with KERNEL_ISA; `added`, the flags for those of KERNEL_ISA the target lacks."""

    target: str
    assumes: frozenset[str]
    added: tuple[str, ...]

    @classmethod
    def of(cls, target: str) -> "Build":
        if target == "native":  # this CPU's own: the key holds its flags, so only KERNEL_ISA is in question
            return cls(target, frozenset(KERNEL_ISA), ())
        isa = target_isa(target)
        return cls(target, isa | set(KERNEL_ISA), tuple(flag for name, flag in KERNEL_ISA.items() if name not in isa))

    @property
    def flags(self) -> list[str]:
        return [flag.format(target=self.target) for flag in FLAGS] + list(self.added)

    def lacks(self, cpu: str) -> list[str]:
        """What this build assumes that a CPU with flags `cpu` (a /proc/cpuinfo flags line) does not have."""
        return sorted(self.assumes - set(cpu.split()))


def cache_key(build: Build) -> str:
    """A digest of everything the built library depends on: the sources, the flags (the target's among them), torch
    and Python, the compiler, and for -march=native the CPU."""
    digest = hashlib.sha256()
    for path in SOURCES + HEADERS:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for part in (NAME, *build.flags, *LINK_FLAGS, torch.__version__, sys.implementation.cache_tag,
                 cpu_flags() if build.target == "native" else "", compiler_version()):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def cache_dir(build: Build) -> Path:
    """The directory of `build` in the kernel cache, created."""
    base = os.environ.get("LOCALMOE_KERNEL_CACHE")
    if not base:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "localmoe" / "kernels"
    directory = Path(base) / cache_key(build)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@dataclass
class KernelStatus:
    """What `kernels()` found: for the start-up log and /v1/stats/performance."""

    state: str  # "not loaded" (yet), "loaded", "built", "off" (LOCALMOE_CPU_KERNELS=0), "unsupported" (no target
    #             fits), "failed" (no compiler, a build that failed)
    target: str | None = None  # the -march target of the library in use
    lacking: dict[str, list[str]] = field(default_factory=dict)  # target passed over -> what this CPU lacks
    directory: str | None = None


_status = KernelStatus("not loaded")


def status() -> dict:
    """The kernels' state in this process, with the targets asked for."""
    return {**asdict(_status), "targets": cpu_targets()}


@lru_cache(maxsize=None)
def kernels() -> ModuleType | None:
    """The compiled extension, or None where it cannot run here. The first call builds it or loads it from the
    cache; later calls return the same module."""
    global _status
    if os.environ.get("LOCALMOE_CPU_KERNELS", "1") == "0":
        _status = KernelStatus("off")
        return None
    try:  # a target the compiler does not know raises ValueError: a setting to correct, not a CPU to work around
        builds = [Build.of(target) for target in cpu_targets()]
    except OSError as error:
        log.warning("no compiler for the CPU kernels, using the PyTorch paths: %s", error)
        _status = KernelStatus("failed")
        return None
    cpu, lacking = cpu_flags(), {}
    for build in builds:
        if lacks := build.lacks(cpu):
            lacking[build.target] = lacks
            log.warning("this CPU lacks %s, which the CPU kernels built for -march=%s assume", " ".join(lacks),
                        build.target)
            continue
        directory = cache_dir(build)
        state = "loaded" if (directory / BUILT).exists() else "built"
        try:
            module = load_built(build_into(directory, build))
        except Exception as error:  # noqa: BLE001 -- no compiler, headers, ...: the PyTorch paths serve
            log.warning("building the CPU kernels failed, using the PyTorch paths: %s", error)
            _status = KernelStatus("failed", build.target, lacking, str(directory))
            return None
        _status = KernelStatus(state, build.target, lacking, str(directory))
        return module
    log.warning("no CPU kernel target of %s=%s runs on this CPU: serving on the PyTorch paths (slower on CPU)",
                TARGET_VARIABLE, ",".join(cpu_targets()))
    _status = KernelStatus("unsupported", lacking=lacking)
    return None


def build_into(directory: Path, build: Build) -> Path:
    """Build the library for `build` in `directory`, unless a finished build is there; returns `directory`. What is
    built is not imported: the CPU building it need not run it (an image built for another CPU model)."""
    if (directory / BUILT).exists():
        return directory
    with open(directory / BUILD_LOCK, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process building the CPU kernels in %s", directory)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (directory / BUILT).exists():  # that other process finished it
            return directory
        # torch's lock file, left by a build killed midway; no one else builds here while we hold the flock
        (directory / TORCH_BATON).unlink(missing_ok=True)
        from torch.utils.cpp_extension import load

        start = time.monotonic()
        load(NAME, [str(s) for s in SOURCES], extra_cflags=build.flags, extra_ldflags=LINK_FLAGS,
             build_directory=str(directory), verbose=False, is_python_module=False)
        (directory / BUILT).touch()
    log.info("CPU kernels built for -march=%s in %.0f s into %s", build.target, time.monotonic() - start, directory)
    return directory


def load_built(directory: Path) -> ModuleType:
    """Import a finished build directly: no ninja, no lock."""
    spec = importlib.util.spec_from_file_location(NAME, directory / f"{NAME}.so")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    log.info("CPU kernels loaded from %s", directory)
    return module


def runs_here(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: on CPU, bfloat16 or float32, and the kernels built."""
    return (all(t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float32) for t in tensors)
            and kernels() is not None)


def to_tiles(weight: torch.Tensor) -> torch.Tensor:
    """weight [..., rows, k] (rows a multiple of 16, k even; bf16, or any 2-byte dtype) -> the same numbers in
    tiles, same shape: each run of TILE_ROWS rows (the last may be shorter) stored as [k / 2, rows, 2], the rows'
    column pairs side by side, which is what one vector load of the kernels takes (tiled_matmul_cpu.cpp)."""
    if weight.numel() == 0:
        return torch.empty_like(weight, memory_format=torch.contiguous_format)
    return kernels().to_tiles(weight)


def linear_tiles(weight: torch.Tensor) -> torch.Tensor:
    """A dense weight [N, K] in tiles, its rows padded with zeros to a multiple of 16."""
    return to_tiles(F.pad(weight, (0, 0, 0, -weight.shape[0] % 16)))


def gate_up_paired(w13: torch.Tensor) -> torch.Tensor:
    """w13 [.., 2I, X] (gate rows, then up rows) with each 32 gate rows followed by their 32 up rows, so that one
    tile of fused_moe holds both halves of SwiGLU for 32 units (X: any row contents, e.g. scales)."""
    inter = w13.shape[-2] // 2
    gate, up = w13[..., :inter, :], w13[..., inter:, :]
    units = TILE_ROWS // 2
    return torch.cat([half[..., first:first + units, :] for first in range(0, inter, units) for half in (gate, up)],
                     dim=-2)


def expert_tiles(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked experts in the layout of fused_moe: w13 [.., 2I, D] in gate_up_paired order, then both in tiles."""
    return to_tiles(gate_up_paired(w13)), to_tiles(w2)


@dataclass
class QuantTiles:
    """A QuantizedWeight [.., N, K] in the tiles of the quantized kernels: q [.., N, K bits / 8] uint8 (quant_tiles
    in tiled_matmul_cpu.cpp; float8 e4m3 bytes where `float8`), scales and zeros float32 [.., K / group, N] in
    `tile_major` order (a group's scales of 16 rows are one vector load, and a tile's scales one run)."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    float8: bool = False
    PARTS: ClassVar[tuple[str, ...]] = ("q", "scales", "zeros")  # the tensors, in tensors()' order

    @classmethod
    def of(cls, weight: QuantizedWeight, rows_in=lambda t: t) -> "QuantTiles":
        """`rows_in` reorders the rows first (gate_up_paired for experts' w13)."""
        q = kernels().quant_tiles(rows_in(weight.values()), weight.bits)
        scales, zeros = (tile_major(rows_in(t)) for t in (weight.scales, weight.zeros))
        return cls(q, scales, zeros, weight.bits, weight.float8)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q, self.scales, self.zeros


def tile_major(values: torch.Tensor) -> torch.Tensor:
    """Per-row values [.., N, G] (a scale per row and group) as the quantized kernels read them: a tensor of shape
    [.., G, N] holding, tile by tile (runs of TILE_ROWS rows, the last maybe shorter), each tile's [G, rows]. A tile
    then reads its scales in one run as it reads its weights, not one scattered cache line per group."""
    groups, rows = values.shape[-1], values.shape[-2]
    tiles = [values[..., first:first + TILE_ROWS, :].transpose(-1, -2).flatten(-2)
             for first in range(0, rows, TILE_ROWS)]
    return torch.cat(tiles, dim=-1).unflatten(-1, (groups, rows)) if tiles else values.transpose(-1, -2).contiguous()


def quant_expert_tiles(w13: QuantizedWeight, w2: QuantizedWeight) -> tuple[QuantTiles, QuantTiles]:
    """Quantized stacked experts in the layout of fused_moe, as expert_tiles lays out bf16 ones."""
    return QuantTiles.of(w13, gate_up_paired), QuantTiles.of(w2)


def quant_linear_tiles(weight: QuantizedWeight) -> QuantTiles:
    """A dense quantized weight [N, K] in tiles, its rows padded to a multiple of 16 (zero scales: they add 0)."""
    pad = -weight.shape[0] % 16
    return QuantTiles.of(weight.like(*(F.pad(t, (0, 0, 0, pad)) for t in (weight.packed, weight.scales,
                                                                         weight.zeros))))


def quant_kernel_serves(weight: QuantizedWeight) -> bool:
    """Whether the quantized kernels take this weight: its rows in groups of a multiple of 16 columns."""
    return weight.group_size % 16 == 0 and weight.shape[-1] % 16 == 0 and kernels() is not None


def tiled_linear(x: torch.Tensor, tiles: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [T, K] @ weight.T for a weight in linear_tiles, in bf16."""
    if x.shape[0] == 0:  # a step where no row needs it: no kernel is called on an empty batch
        return x.new_empty(0, out_features)
    return kernels().tiled_linear(x, tiles, out_features)


def tiled_linear_quant(x: torch.Tensor, tiles: QuantTiles, out_features: int) -> torch.Tensor:
    """x [T, K] @ weight.T for a quantized weight in quant_linear_tiles, bf16 activations."""
    if x.shape[0] == 0:
        return x.new_empty(0, out_features)
    return kernels().tiled_linear_quant(x, *tiles.tensors(), tiles.bits, tiles.float8, out_features)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1) for float32 [S, V]: our kernel where it runs, else PyTorch's."""
    if logits.dim() == 2 and logits.dtype == torch.float32 and logits.numel() > 0 and runs_here(logits):
        return kernels().argmax_rows(logits)
    return logits.argmax(dim=-1)


def fused_moe(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor | QuantTiles,
              w2: torch.Tensor | QuantTiles, float_out: bool = False) -> torch.Tensor:
    """sum_k weights[t, k] * SwiGLU expert ids[t, k] applied to x[t], for experts in expert_tiles (or QuantTiles of
    both, w13's rows gate_up_paired, 8 or 4 bits each, or both float8); see tiled_matmul_cpu.cpp. The sums are kept
    in float32; bf16 is returned unless `float_out` (for callers adding several partial sums; for top-2, adding
    those gives exactly the one call's sums)."""
    if x.shape[0] == 0:  # no tokens routed this step: no kernel call
        return x.new_empty(x.shape, dtype=torch.float32 if float_out else torch.bfloat16)
    if isinstance(w13, QuantTiles):
        return kernels().fused_moe_quant(x, expert_ids, weights, *w13.tensors(), *w2.tensors(), w13.bits, w2.bits,
                                         w13.float8, float_out)
    return kernels().fused_moe(x, expert_ids, weights, w13, w2, float_out)

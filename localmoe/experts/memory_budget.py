"""How much memory an expert cache may take when left to LocalMoE (`expert_cache_memory: auto`).

What the process may use is its memory cgroup's limit (v2 `memory.max`, v1 `memory.limit_in_bytes`: a
container's limit), less what it holds already (its resident set after loading the resident weights and the
runtime); without a limit, the RAM the kernel reports available. From that come the KV pool and swap space still
to be allocated and a reserve for what steps allocate as they run (activations, the tokenizer, the server).
So the same command serves inside a container's limit without being killed or thrashing.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
RUNTIME_RESERVE = 256 * 2**20  # working memory of a step, the server and the tokenizer, above what loading left
UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a huge number (9223372036854771712)


def cgroup_limit(proc_cgroup: str | None = None, root: Path = CGROUP_ROOT) -> int | None:
    """The memory limit of this process's cgroup in bytes, None where there is none."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            limit_file = root / path.lstrip("/") / "memory.max"
        elif "memory" in controllers.split(","):
            limit_file = root / "memory" / path.lstrip("/") / "memory.limit_in_bytes"
        else:
            continue
        try:
            text = limit_file.read_text().strip()
        except OSError:
            continue
        if text != "max" and int(text) < UNLIMITED:
            return int(text)
    return None


def available_ram() -> int:
    """MemAvailable from /proc/meminfo: what can be allocated without swapping."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable")


def resident_bytes() -> int:
    """This process's resident set size (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_left() -> int:
    """What this process may still allocate: its cgroup's limit less its resident set, or the available RAM,
    whichever is less."""
    free = available_ram()
    limit = cgroup_limit()
    if limit is not None:
        free = min(free, limit - resident_bytes())
    return max(0, free)


def auto_cache_bytes(still_to_allocate: int, reserve: int = RUNTIME_RESERVE) -> int:
    """Bytes left for the expert cache: what this process may still use, less `still_to_allocate` (the KV pool
    and swap space) and `reserve`; 0 when nothing is left."""
    return max(0, memory_left() - still_to_allocate - reserve)

"""ExpertFile: every offloaded expert laid out once, as its compute reads it, in one local file.

A disk store could read each miss from the checkpoint itself, but a checkpoint keeps an expert as several
tensors (w1, w3, w2, or rows of a stacked one) in its own dtype and row order: each read then has to be mapped,
cast and rearranged into the CPU kernel's tiles again, which made a one-slot cache 40% slower than it was
before the tiles (8.9 -> 5.1 tok/s). So the store writes every expert once, in the serving dtype and layout,
to a file under the LocalMoE cache (keyed by the checkpoint files, the layers and the layout, so a restart
reuses it and a change rebuilds it), each expert's w13 and w2 on 4 KiB boundaries. A miss is then two reads
straight into the cache slot.

Reads bypass the page cache (O_DIRECT) where the slot and the sizes allow: the expert cache decides what stays
in memory, and the kernel keeps no second copy of what the slots already hold (inside a container's memory
limit, page cache counts against the limit). Where direct I/O cannot be used (unaligned sizes, a filesystem
without it, a CUDA slot) the read is buffered and its pages are dropped right after (POSIX_FADV_DONTNEED).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

ALIGN = 4096  # direct I/O's alignment of offsets, lengths and buffers
COMPLETE = "complete"  # written next to the file once every expert is in it


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _bytes_view(tensor: torch.Tensor) -> memoryview:
    """The CPU tensor's memory as writable bytes."""
    return memoryview(tensor.view(-1).view(torch.uint8).numpy())


class ExpertFile:
    def __init__(self, path: Path, layers: dict[str, tuple[int, dict[str, int]]]) -> None:
        """`layers`: layer path -> (experts, bytes of each kind of tensor per expert), in file order."""
        self.path = path
        self.layers = layers
        self.offsets: dict[tuple[str, int, str], tuple[int, int]] = {}  # (layer, expert, kind) -> (offset, bytes)
        offset = 0
        for layer, (num_experts, sizes) in layers.items():
            for expert in range(num_experts):
                for kind, nbytes in sizes.items():
                    self.offsets[layer, expert, kind] = offset, nbytes
                    offset += _aligned(nbytes)
        self.size = offset
        self._direct: int | None = None  # -1: direct I/O is not available here
        self._buffered: int | None = None
        self.direct_reads = 0  # tensors read past the page cache
        self.buffered_reads = 0

    @staticmethod
    def key(description: dict) -> str:
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]

    def ready(self) -> bool:
        return (self.path.parent / COMPLETE).exists() and self.path.exists() and self.path.stat().st_size >= self.size

    def build(self, expert: Callable[[str, int], dict[str, torch.Tensor]], after_layer: Callable[[str], None]) -> None:
        """Write every expert (`expert(layer, index)` gives its laid-out tensors) unless a complete file is there
        already; one process builds, others wait on its lock and then find the file complete."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.parent / "build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.ready():
                return
            for stale in self.path.parent.glob(f"{self.path.name}.partial-*"):  # left by a build that was killed
                stale.unlink()
            partial = self.path.with_name(f"{self.path.name}.partial-{os.getpid()}")
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.ftruncate(fd, self.size)
                for layer, (num_experts, _) in self.layers.items():
                    for index in range(num_experts):
                        for kind, tensor in expert(layer, index).items():
                            os.pwrite(fd, _bytes_view(tensor.contiguous()), self.offsets[layer, index, kind][0])
                    os.fdatasync(fd)  # written back, so the pages can go: the file may be larger than memory
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    after_layer(layer)
            finally:
                os.close(fd)
            os.replace(partial, self.path)
            (self.path.parent / COMPLETE).touch()

    def read_into(self, layer: str, expert: int, dest: dict[str, torch.Tensor]) -> int:
        """Read one expert into `dest` (kind -> a slot's tensors); returns the bytes read."""
        moved = 0
        for kind, slot in dest.items():
            offset, nbytes = self.offsets[layer, expert, kind]
            if self._direct_fits(slot, nbytes) and self._read_direct(slot, offset):
                self.direct_reads += 1
            else:
                self.buffered_reads += 1
                fd = self._buffered_fd()
                data = bytearray(nbytes)
                read_fully(fd, memoryview(data), offset)
                os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
                slot.copy_(torch.frombuffer(data, dtype=slot.dtype).view(slot.shape))
            moved += nbytes
        return moved

    def _read_direct(self, slot: torch.Tensor, offset: int) -> bool:
        """Read straight into the slot, bypassing the page cache; False where this filesystem will not."""
        if self._direct is None:
            try:
                self._direct = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            except (OSError, AttributeError):  # no O_DIRECT here (tmpfs, another OS)
                self._direct = -1
        if self._direct < 0:
            return False
        try:
            read_fully(self._direct, _bytes_view(slot), offset)
            return True
        except OSError:  # EINVAL: the filesystem took the flag at open but does not do direct reads
            os.close(self._direct)
            self._direct = -1
            return False

    @staticmethod
    def _direct_fits(slot: torch.Tensor, nbytes: int) -> bool:
        return (slot.device.type == "cpu" and slot.is_contiguous() and slot.data_ptr() % ALIGN == 0
                and nbytes % ALIGN == 0 and slot.numel() * slot.element_size() == nbytes)

    def _buffered_fd(self) -> int:
        if self._buffered is None:
            self._buffered = os.open(self.path, os.O_RDONLY)
        return self._buffered


def read_fully(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` from the file at `offset` (a pread may return less than asked)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += got

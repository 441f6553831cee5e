"""Large CPU buffers on transparent huge pages (2 MiB rather than 4 KiB).

A decode step streams every weight it uses (~90 MB a token for the benchmark model) and the KV blocks of every
sequence. On 4 KiB pages that is a TLB miss every 4 KiB, and the hardware prefetchers stop at each page's end;
on 2 MiB pages the same reads ran 10-20% faster at one sequence. Kernels set to transparent huge pages on request
only ("madvise", the usual default) give them to memory that asks: a fresh anonymous mapping, advised before it
is first touched. Where the system does not offer them, the buffers are ordinary memory.
"""

from __future__ import annotations

import ctypes
import math
import mmap

import torch

HUGE_PAGE = 2 * 1024**2


def huge_page_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor starting on a 2 MiB boundary of memory advised to use huge pages (the tensor
    keeps the mapping alive); small ones, or where madvise is missing, are plain torch.empty."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    # private and anonymous (a shared mapping would be shmem, which has its own, usually disabled, huge pages);
    # the slack before the boundary is never touched
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel built without transparent huge pages: the mapping serves as ordinary memory
        pass
    start = ctypes.addressof(ctypes.c_char.from_buffer(region))
    flat = torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=-start % HUGE_PAGE)
    return flat.view(dtype).view(shape)


def on_huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a CPU tensor in huge_page_empty memory."""
    return huge_page_empty(tuple(tensor.shape), tensor.dtype).copy_(tensor)


def huge_page_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """huge_page_empty filled with zeros, every page touched (mapped) now."""
    return huge_page_empty(shape, dtype).zero_()


def page_aligned_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros starting on a page boundary, for buffers that direct I/O reads into: huge_page_zeros when large,
    else an anonymous mapping of their own (zero-filled, page-aligned)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes >= HUGE_PAGE or nbytes == 0:
        return huge_page_zeros(shape, dtype)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(region, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)

"""Weights and the KV pool on transparent huge pages (layers/huge_pages.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from localmoe.layers.cpu_kernels import cpu_has_avx512_bf16
from localmoe.layers.huge_pages import HUGE_PAGE, huge_page_empty, huge_page_zeros, on_huge_pages
from localmoe.layers.linear import Linear


def mapping_of(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding `address`."""
    fields: dict[str, str] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if not head.endswith(":"):  # a mapping's first line: "start-end perms ..."
            low, high = (int(x, 16) for x in head.split("-"))
            inside = low <= address < high
        elif inside:
            fields[head[:-1]] = line.split(maxsplit=1)[1] if len(line.split()) > 1 else ""
    return fields


def test_large_buffers_start_on_a_huge_page_advised_for_huge_pages():
    weight = torch.randn(1536, 1024)  # 6 MiB
    copy = on_huge_pages(weight)
    assert torch.equal(copy, weight) and copy.data_ptr() % HUGE_PAGE == 0
    assert "hg" in mapping_of(copy.data_ptr())["VmFlags"].split()  # MADV_HUGEPAGE
    zeros = huge_page_zeros((4, HUGE_PAGE // 4), torch.float32)
    assert zeros.data_ptr() % HUGE_PAGE == 0 and not zeros.any()
    small = huge_page_empty((16,), torch.float32)  # below one huge page: ordinary memory
    assert "hg" not in mapping_of(small.data_ptr()).get("VmFlags", "").split()


def test_a_buffer_outlives_the_function_that_mapped_it():
    buffers = [on_huge_pages(torch.full((HUGE_PAGE,), float(i))) for i in range(3)]
    torch.randn(4 * HUGE_PAGE)  # other allocations do not reuse the mappings
    assert [float(b[-1]) for b in buffers] == [0.0, 1.0, 2.0]


@pytest.mark.avx512_bf16
@pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="needs a CPU with AVX512-BF16")
def test_packed_bf16_weights_live_on_huge_pages():
    linear = Linear(1024, 2048, bias=False).bfloat16()
    linear.pack()
    assert linear.tiled and linear.weight.data_ptr() % HUGE_PAGE == 0
    assert "hg" in mapping_of(linear.weight.data_ptr())["VmFlags"].split()

"""The expert file: every offloaded expert laid out once on local disk, read back straight into cache slots."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import torch

from localmoe.experts.expert_file import ExpertFile
from localmoe.layers.huge_pages import page_aligned_zeros

LAYERS = {"layers.0.mlp.experts": (3, {"w13": 8192, "w2": 4096}), "layers.1.mlp.experts": (3, {"w13": 8192, "w2": 4096})}


def expert(layer: str, index: int) -> dict[str, torch.Tensor]:
    """Recognisable values: (layer, expert, kind) in every element."""
    base = 100 * int(layer.split(".")[1]) + 10 * index
    return {"w13": torch.full((2048,), base + 1.0), "w2": torch.full((1024,), base + 2.0)}


def direct_io_works(directory: Path) -> bool:
    """Does this filesystem read with O_DIRECT (ext4, xfs: yes; tmpfs: no)?"""
    probe = directory / "probe"
    probe.write_bytes(b"x" * 4096)
    buffer = mmap.mmap(-1, 4096)
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        return os.preadv(fd, [buffer], 0) == 4096
    except OSError:
        return False
    finally:
        os.close(fd)


def test_experts_read_back_into_slots(tmp_path):
    file = ExpertFile(tmp_path / "key" / "experts.bin", LAYERS)
    built = []
    file.build(expert, built.append)
    assert built == list(LAYERS) and file.ready()
    slots = {"w13": page_aligned_zeros((2048,), torch.float32), "w2": page_aligned_zeros((1024,), torch.float32)}
    for layer in LAYERS:
        for index in range(3):
            assert file.read_into(layer, index, slots) == 8192 + 4096
            assert all(torch.equal(slots[k], v) for k, v in expert(layer, index).items())
    if direct_io_works(tmp_path):  # aligned slots and sizes: every read bypassed the page cache
        assert (file.direct_reads, file.buffered_reads) == (12, 0)
    else:
        assert (file.direct_reads, file.buffered_reads) == (0, 12)


def test_unaligned_slots_are_read_through_the_page_cache(tmp_path):
    file = ExpertFile(tmp_path / "key" / "experts.bin", LAYERS)
    file.build(expert, lambda _: None)
    slots = {"w13": torch.zeros(2049)[1:], "w2": torch.zeros(1025)[1:]}  # 4 bytes past an aligned start
    file.read_into("layers.1.mlp.experts", 2, slots)
    assert torch.equal(slots["w13"], expert("layers.1.mlp.experts", 2)["w13"])
    assert (file.direct_reads, file.buffered_reads) == (0, 2)


def test_a_complete_file_is_reused_and_a_killed_build_is_cleaned_up(tmp_path):
    path = tmp_path / "key" / "experts.bin"
    path.parent.mkdir()
    stale = path.with_name("experts.bin.partial-999999")
    stale.write_bytes(b"half an expert")
    ExpertFile(path, LAYERS).build(expert, lambda _: None)
    assert not stale.exists() and path.stat().st_size == 2 * 3 * (8192 + 4096)
    calls = []
    ExpertFile(path, LAYERS).build(lambda layer, index: calls.append(index) or expert(layer, index), lambda _: None)
    assert calls == []  # found complete: nothing written again
    assert ExpertFile.key({"a": 1}) != ExpertFile.key({"a": 2})

"""gpu_memory_utilization sizes the KV pool after a profiling step of the largest batch (vLLM's profile run)."""

from __future__ import annotations

import pytest
import torch

from family_parity import engine
from localmoe.engine.memory_profile import dummy_step, peak_step_bytes
from localmoe.engine.model_runner import kv_cache_shapes


def test_the_dummy_step_is_the_largest_batch_the_scheduler_may_form():
    lens, tables, used = dummy_step(max_tokens=10, max_seqs=4, max_len=100, block_size=4)
    assert lens == [3, 3, 2, 2] and used == 4
    assert [b for t in tables for b in t] == list(range(used))  # each sequence its own blocks
    assert dummy_step(10, 20, 100, 4)[0] == [1] * 10  # never more sequences than tokens
    assert dummy_step(512, 2, 100, 16)[0] == [100, 100]  # no sequence past max_model_len


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_profiled_peak_grows_with_the_batch(tiny_mixtral_dir):
    runner = engine(tiny_mixtral_dir, device="cuda", gpu_memory_utilization=0.3, max_model_len=2048).engine.runner

    def caches(num_blocks):
        return [torch.zeros(s, device="cuda") for s in kv_cache_shapes(runner.model, num_blocks, 4, torch.float32)]

    peaks = [peak_step_bytes(runner.model, caches, tokens, 8, 2048, 4, runner.device) for tokens in (64, 2048)]
    assert 0 < peaks[0] < peaks[1]

"""How much memory a step's activations take on CUDA, measured as vLLM's profile run does it: one dummy step of
the largest batch the scheduler may form (max_num_batched_tokens prompt tokens over up to max_num_seqs sequences),
logits included, before the KV pool exists. The pool then gets gpu_memory_utilization of the device less the
weights and this peak, so the largest step still fits beside a full pool.

Not counted: the CUDA graphs' memory pool (captured after the KV pool, small beside it for decode batches), which
the headroom of gpu_memory_utilization < 1 covers, as in vLLM.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from localmoe.layers.attention import AttentionMetadata


def dummy_step(max_tokens: int, max_seqs: int, max_len: int,
               block_size: int) -> tuple[list[int], list[list[int]], int]:
    """The profiled batch: max_tokens prompt tokens (no more than max_seqs sequences of max_len hold) split as
    evenly as they go over up to max_seqs sequences, each from position 0; returns (tokens per sequence, block
    tables, blocks used)."""
    max_tokens = min(max_tokens, max_seqs * max_len)
    seqs = min(max_seqs, max_tokens)
    lens = [max_tokens // seqs + (i < max_tokens % seqs) for i in range(seqs)]
    tables, used = [], 0
    for n in lens:
        blocks = -(-n // block_size)
        tables.append(list(range(used, used + blocks)))
        used += blocks
    return lens, tables, used


@torch.inference_mode()
def peak_step_bytes(model: nn.Module, make_caches: Callable[[int], list[torch.Tensor]], max_tokens: int,
                    max_seqs: int, max_len: int, block_size: int, device: torch.device) -> int:
    """Bytes a step of the largest batch allocates on the CUDA device `device` at its peak, beyond what is held
    before it; `make_caches(n)` gives a KV pool of n blocks for the step to write to (freed after)."""
    lens, tables, num_blocks = dummy_step(max_tokens, max_seqs, max_len, block_size)
    caches = make_caches(num_blocks)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    meta = AttentionMetadata.build(lens, lens, tables, block_size, device)
    positions = torch.cat([torch.arange(n, device=device) for n in lens])
    hidden = model(torch.zeros_like(positions), positions, caches, meta)
    last = torch.cumsum(torch.tensor(lens, device=device), 0) - 1
    model.compute_logits(hidden[last]).float()  # the sampler's logits, one row per sequence
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del caches, meta, hidden
    torch.cuda.empty_cache()
    return peak

"""Turns a scheduled batch into one flat forward pass over the paged KV cache.

The step's tokens from every sequence are concatenated ([T]); attention metadata says where each
token's K/V goes and which blocks each sequence reads. Logits are computed only for sequences
whose last token is in this step (those are the ones that sample).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from localmoe.engine.scheduler import ScheduledBatch
from localmoe.layers.attention import AttentionMetadata
from localmoe.layers.huge_pages import huge_page_zeros


def kv_block_bytes(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes over all layers (each attention kind says what it caches per token)."""
    return sum(math.prod(layer.self_attn.kv_cache_shape(1, block_size)) for layer in model.layers) * dtype.itemsize


@dataclass
class StepLogits:
    sample: torch.Tensor  # float32 [S, V] at the last token of each sampling sequence
    sampling: list[int]  # batch index of each of those S sequences
    prompt: dict[int, torch.Tensor]  # batch index -> [n, V] at every prompt token computed this step


class ModelRunner:
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype, num_swap_blocks: int = 0) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        # a layer's cache is [parts, blocks, ...]: block ids index dimension 1 whatever the attention kind.
        # Zero-filled, so every page is mapped now: the block manager hands blocks out across the whole pool
        # (LRU, for the prefix cache), and first touches during serving cost a page fault each, some of them
        # milliseconds on a virtual machine (lazily mapped, a 2 GiB pool took 4.5x the system time under load
        # and served 8% fewer tokens/s at concurrency 16). On CPU, on huge pages (layers/huge_pages.py): attention
        # reads blocks from all over the pool.
        shapes = [layer.self_attn.kv_cache_shape(num_blocks, block_size) for layer in model.layers]
        self.kv_caches = [huge_page_zeros(shape, dtype) if device.type == "cpu"
                          else torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.swap_caches = [torch.zeros((shape[0], num_swap_blocks, *shape[2:]), dtype=dtype)
                            for shape in shapes]

    def swap(self, batch: ScheduledBatch) -> None:
        """Copy preempted sequences' blocks to host memory, then swapped-in ones back (in that order:
        a block freed by a swap-out may be the target of a swap-in in the same step)."""
        for copies, to_host in ((batch.swap_out, True), (batch.swap_in, False)):
            if not copies:
                continue
            src, dst = (torch.tensor(ids, dtype=torch.long) for ids in zip(*copies))
            for cache, swap in zip(self.kv_caches, self.swap_caches):
                if to_host:
                    swap[:, dst] = cache[:, src.to(cache.device)].to("cpu")
                else:
                    cache[:, dst.to(cache.device)] = swap[:, src].to(cache.device)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepLogits:
        input_ids: list[int] = []
        positions: list[int] = []
        context_lens: list[int] = []
        sample_rows: list[int] = []  # row in the flat batch of each sampling sequence's last token
        sampling: list[int] = []
        prompt_rows: dict[int, range] = {}
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            start = seq.num_computed_tokens
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens:
                prompt_rows[i] = range(len(input_ids), len(input_ids) + min(n, seq.num_prompt_tokens - start))
            input_ids += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            context_lens.append(start + n)
            if start + n == seq.num_tokens:
                sampling.append(i)
                sample_rows.append(len(input_ids) - 1)
        meta = AttentionMetadata.build(
            batch.num_tokens, context_lens, [s.block_table for s in batch.seqs], self.block_size, self.device)
        hidden = self.model(
            torch.tensor(input_ids, device=self.device), torch.tensor(positions, device=self.device),
            self.kv_caches, meta)
        prompt = {i: self.model.compute_logits(hidden[r.start:r.stop]).float() for i, r in prompt_rows.items()}
        if sampling:
            rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
            sample = self.model.compute_logits(hidden[rows]).float()
        else:  # only prompt chunks that end before their prompt does: nothing samples, no output head runs
            sample = torch.empty(0, self.model.lm_head.out_features, dtype=torch.float32, device=self.device)
        return StepLogits(sample, sampling, prompt)

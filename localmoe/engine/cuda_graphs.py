"""CUDA graphs for decode steps (vLLM's cudagraph_capture_sizes): a decode step of B sequences replays the graph
captured for the smallest capture size >= B, its inputs copied into buffers allocated once.

Why: a decode step of a small model is hundreds of short kernel launches; replaying them as one graph removes the
launch gaps, which at one stream are most of the step. Prefill and mixed steps, and batches larger than the
largest size, run eagerly. A step padded up to its capture size fills the extra rows with a harmless decode: each
pad token sits in a scratch block that the block manager never hands out (the pool has one block more), attends to
one key there, and its output is dropped.

A graph captures only the device work: whatever the model would do on the host during a step must be absent.
So graphs are used only where every layer runs on sync-free kernels (the Triton paths: standard attention on a
cache in the model's dtype, TritonExperts), on one rank, with experts resident; `enforce_eager` turns them off.
The forward pre-hooks on the experts modules (the routing observer's) are replayed by hand after each graph, with
the step's rows of the inputs they saw at capture, since a replay runs no Python.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from localmoe.experts.gpu import TritonExperts
from localmoe.layers.attention import AttentionMetadata, triton_takes
from localmoe.layers.moe import moe_blocks
from localmoe.models.llama import Attention

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """vLLM's default sizes, 1, 2, 4 and then every multiple of 8, below max_num_seqs (at most 512), and that."""
    limit = min(max_num_seqs, 512)
    return sorted({s for s in (1, 2, 4, *range(8, limit, 8)) if s < limit} | {limit})


def graphs_apply(model: nn.Module, kv_caches: list[torch.Tensor]) -> str | None:
    """Why decode steps of this model cannot be captured, or None where they can."""
    for layer, kv_cache in zip(model.layers, kv_caches):
        attention = layer.self_attn
        if not isinstance(attention, Attention):
            return f"{type(attention).__name__} keeps the PyTorch attention path"
        probe = kv_cache.new_empty(1, attention.num_heads, attention.head_dim)
        if not triton_takes(probe, kv_cache):
            return "attention runs on the PyTorch path here (fp8 cache, or block size not a power of two)"
    for path, moe in moe_blocks(model):
        if not isinstance(moe.experts, TritonExperts):
            return f"{path}'s experts ({type(moe.experts).__name__}) are not the Triton kernel's"
    return None


def padded_decode_inputs(size: int, input_ids: list[int], positions: list[int], block_tables: list[list[int]],
                         block_size: int, width: int, scratch: int) -> dict[str, np.ndarray]:
    """A decode step of B <= size sequences as the graph's input buffers hold it (named as DecodeGraphs' buffers):
    rows past B are pad tokens at position 0 whose one key and table live in the scratch block."""
    count = len(input_ids)
    pos = np.asarray(positions, dtype=np.int64)
    tables = np.full((size, width), scratch, dtype=np.int64)
    for i, table in enumerate(block_tables):
        tables[i, :len(table)] = table
    inputs = {"block_tables": tables, "slot_blocks": np.full(size, scratch, dtype=np.int64)}
    inputs["slot_blocks"][:count] = tables[np.arange(count), pos // block_size]
    for name, values, pad in (("input_ids", input_ids, 0), ("positions", pos, 0),
                              ("slot_offsets", pos % block_size, 0), ("context_lens", pos + 1, 1)):
        inputs[name] = np.full(size, pad, dtype=np.int64)
        inputs[name][:count] = values
    return inputs


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # [size, D] the step's final hidden states
    experts_inputs: list[tuple[nn.Module, tuple[torch.Tensor, ...]]]  # what each experts module saw at capture


class DecodeGraphs:
    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], sizes: list[int], max_blocks: int,
                 block_size: int, scratch_block: int) -> None:
        self.model, self.kv_caches, self.sizes = model, kv_caches, sorted(sizes)
        self.block_size, self.scratch = block_size, scratch_block
        largest, device = self.sizes[-1], kv_caches[0].device
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.slot_blocks = torch.full((largest,), scratch_block, dtype=torch.long, device=device)
        self.slot_offsets = torch.zeros(largest, dtype=torch.long, device=device)
        self.block_tables = torch.full((largest, max_blocks), scratch_block, dtype=torch.long, device=device)
        self.context_lens = torch.ones(largest, dtype=torch.long, device=device)
        self.graphs: dict[int, _Graph] = {}
        self.replayed = 0  # decode steps served by a graph
        pool = None
        for size in reversed(self.sizes):  # the largest first: the smaller ones reuse its memory pool
            self.graphs[size] = self._capture(size, pool)
            pool = self.graphs[size].graph.pool()

    def _meta(self, size: int) -> AttentionMetadata:
        """Decode metadata of `size` rows whose device tensors are the buffers' first rows (what the Triton paths
        read), so that a replay reads what replay() copied there."""
        meta = AttentionMetadata.build([1] * size, [1] * size, [[self.scratch]] * size, self.block_size,
                                       self.block_tables.device)
        tables, context = self.block_tables[:size], self.context_lens[:size]
        for name, buffer in (("slot_blocks", self.slot_blocks[:size]), ("slot_offsets", self.slot_offsets[:size]),
                             ("block_tables", tables), ("token_tables", tables), ("context_lens", context),
                             ("token_context", context)):
            setattr(meta, name, buffer)
        return meta

    @torch.inference_mode()
    def _capture(self, size: int, pool: tuple | None) -> _Graph:
        seen: list[tuple[nn.Module, tuple[torch.Tensor, ...]]] = []
        # warm up (Triton compiles, the allocator settles; every slot is the scratch block) on other tensor objects
        # than the capture's: what a layer caches per step by its inputs' identity (the rotary's cos/sin for these
        # positions) must be computed inside the capture, or the graph would replay the warm-up's values
        self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, self._meta(size))
        torch.cuda.synchronize()
        args = (self.input_ids[:size], self.positions[:size], self.kv_caches, self._meta(size))
        hooks = [moe.experts.register_forward_pre_hook(lambda module, inputs: seen.append((module, inputs)))
                 for _, moe in moe_blocks(self.model)]
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.model(*args)
        finally:
            for hook in hooks:
                hook.remove()
        return _Graph(graph, hidden, seen)

    def replay(self, input_ids: list[int], positions: list[int], block_tables: list[list[int]]) -> torch.Tensor | None:
        """The final hidden states [B, D] of a decode step (one new token per sequence, at `positions`), or None
        where no captured size takes B sequences."""
        count = len(input_ids)
        size = next((s for s in self.sizes if s >= count), None)
        if size is None:
            return None
        inputs = padded_decode_inputs(size, input_ids, positions, block_tables, self.block_size,
                                      self.block_tables.shape[1], self.scratch)
        for name, values in inputs.items():
            getattr(self, name)[:size].copy_(torch.from_numpy(values))
        graph = self.graphs[size]
        graph.graph.replay()
        self.replayed += 1
        for module, seen in graph.experts_inputs:  # what eager steps tell the hooks (the routing observer)
            for hook in module._forward_pre_hooks.values():
                hook(module, tuple(t[:count] for t in seen))
        return graph.hidden[:count]


def capture_decode_graphs(model: nn.Module, kv_caches: list[torch.Tensor], max_num_seqs: int, max_blocks: int,
                          block_size: int, scratch_block: int) -> DecodeGraphs | None:
    """The decode graphs of a model on CUDA, or None (eager) where they do not apply, saying why."""
    reason = graphs_apply(model, kv_caches)
    if reason is None:
        try:
            return DecodeGraphs(model, kv_caches, capture_sizes(max_num_seqs), max_blocks, block_size, scratch_block)
        except RuntimeError as error:  # an op that cannot be captured: the step stays correct, only eager
            reason = f"capture failed: {error}"
    logger.info("CUDA graphs off, decode steps run eagerly: %s", reason)
    return None

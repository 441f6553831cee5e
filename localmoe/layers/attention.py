"""Attention over the paged KV cache.

Shapes: T tokens in the step's flat batch, B sequences, H query heads, Hkv key/value heads
(G = H / Hkv query heads share one), D head dim, N blocks in the pool, S block size,
W blocks per sequence (its block table, padded), L = W * S keys per sequence.
A layer's cache is [2, N, Hkv, S, D]: per block, each head's keys are contiguous.

Each step writes the new keys/values into their slots, then every sequence attends to the blocks it
owns (its block table). On CPU our kernel (paged_attention_cpu.cpp) runs every step in one call per layer: each
token is a row that reads its sequence's blocks where they lie, up to its own position, so a prompt chunk's
tokens see each other causally. Against SDPA on the gathered blocks (one layer, 8 heads, one sequence) it is
1.9x faster for a 128-token prompt, 1.3x for 512 and 1024, and 0.88-0.98x for chunks of 256-1024 tokens that
continue 256 cached ones. Where it cannot run, decode steps attend block by block with batched matmuls on the
gathered blocks (about ten times faster on CPU than rearranging them for SDPA at that shape), and steps with
prompt chunks use SDPA.

With an fp8 cache (layers/kv_cache_dtype.py) the new keys and values are stored as e4m3 rows with their scales
and every path reads them back as the same numbers in the query's dtype: the kernel 16 rows at a time, once for
a GQA group, the PyTorch paths a step's blocks at once.

On CUDA, paged attention runs in Triton (layers/triton_attention.py), every step one launch that reads the block
tables directly, as the CPU kernel does; an fp8 cache keeps the PyTorch paths there.

Attention sinks (gpt-oss) are a learned logit per query head that joins each softmax as one more key whose
value is zero: the sink takes a share of the weight, so a head may attend to nothing much. SDPA cannot
express that, so prefill with sinks computes the scores itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from localmoe.layers import cpu_kernels, triton_kernels
from localmoe.layers.kv_cache_dtype import FP8, decode, encode


@dataclass
class AttentionMetadata:
    """Where a step's tokens go in the cache and which blocks each sequence reads. Built on the host with numpy:
    on these small arrays its ops cost ~1 us where PyTorch's cost 5-50 us, which every step would pay. Each tensor
    is made on first use: the CPU kernel reads two of them, the PyTorch paths the others."""

    tables: np.ndarray  # [B, W] block ids, padded with 0
    seq_lens: np.ndarray  # [B] tokens of each sequence after this step (cached + new), its context_lens
    host_token_seq: np.ndarray  # [T] which sequence each token belongs to
    host_token_row: np.ndarray  # [T] row of the token within its sequence's queries
    positions: np.ndarray  # [T] position of each token in its sequence
    query_pos: np.ndarray  # [B, max_q] position of each query row (for the masks)
    decode_only: bool  # every sequence has exactly one query this step
    block_size: int
    device: torch.device
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def build(
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
    ) -> "AttentionMetadata":
        """context_lens count every token a sequence has after this step (cached + new)."""
        ctx_lens = np.asarray(context_lens, dtype=np.int64)
        width = max(len(t) for t in block_tables)
        tables = np.zeros((len(block_tables), width), dtype=np.int64)
        for i, table in enumerate(block_tables):
            tables[i, :len(table)] = table
        if len(query_lens) == sum(query_lens):  # one query a sequence: the common decode step, no repeats
            token_seq = np.arange(len(query_lens))
            return AttentionMetadata(tables, ctx_lens, token_seq, np.zeros_like(token_seq), ctx_lens - 1,
                                     (ctx_lens - 1)[:, None], True, block_size, device)
        q_lens = np.asarray(query_lens, dtype=np.int64)
        token_seq = np.repeat(np.arange(len(query_lens)), q_lens)
        starts = np.cumsum(q_lens) - q_lens
        token_row = np.arange(int(q_lens.sum())) - starts[token_seq]
        positions = ctx_lens[token_seq] - q_lens[token_seq] + token_row
        query_pos = (ctx_lens - q_lens)[:, None] + np.arange(int(q_lens.max()))[None, :]
        return AttentionMetadata(tables, ctx_lens, token_seq, token_row, positions, query_pos, False, block_size,
                                 device)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    @cached_property
    def block_tables(self) -> torch.Tensor:  # [B, W]
        return self._tensor(self.tables)

    @cached_property
    def context_lens(self) -> torch.Tensor:  # [B]
        return self._tensor(self.seq_lens)

    @cached_property
    def slot_blocks(self) -> torch.Tensor:  # [T] block each new token's K/V goes to
        return self._tensor(self.tables[self.host_token_seq, self.positions // self.block_size])

    @cached_property
    def slot_offsets(self) -> torch.Tensor:  # [T] its offset within that block
        return self._tensor(self.positions % self.block_size)

    @cached_property
    def token_seq(self) -> torch.Tensor:  # [T]
        return self._tensor(self.host_token_seq)

    @cached_property
    def token_row(self) -> torch.Tensor:  # [T]
        return self._tensor(self.host_token_row)

    @cached_property
    def token_tables(self) -> torch.Tensor:  # [T, W] the block table of each token's sequence (the kernel's rows)
        return self.block_tables if self.decode_only else self._tensor(self.tables[self.host_token_seq])

    @cached_property
    def token_context(self) -> torch.Tensor:  # [T] keys each token attends to: its position + 1
        return self.context_lens if self.decode_only else self._tensor(self.positions + 1)

    def mask(self, window: int | None) -> torch.Tensor:
        """[B, 1, max_q, L], True where a query may attend to a key: causal, within the sliding window if any.
        Built on first use: the kernel path needs none."""
        if window not in self._masks:
            key_pos = np.arange(self.tables.shape[1] * self.block_size)[None, None, :]
            query_pos = self.query_pos[:, :, None]
            allowed = (key_pos <= query_pos) & (key_pos < self.seq_lens[:, None, None])
            if window is not None:
                allowed &= key_pos > query_pos - window
            self._masks[window] = self._tensor(allowed[:, None])
        return self._masks[window]


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    kv_cache: torch.Tensor,  # [2, N, Hkv, S, D], or [2, N, Hkv, S, D + 1] fp8 rows
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,  # [H]
) -> torch.Tensor:
    """Store this step's K/V in the cache and attend (within the layer's sliding window, with the layer's
    attention sinks if any); returns [T, H, D]. On CPU our kernel (paged_attention_cpu.cpp) does the same in one
    call, every token a row with its own number of keys (a prompt chunk's tokens see each other causally),
    reading the blocks where they lie."""
    if _kernel_takes(q, kv_cache):
        return cpu_kernels.kernels().paged_attention(q, k, v, kv_cache, meta.token_tables, meta.token_context,
                                                      scale, sliding_window or 0, sinks)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    k_cache[meta.slot_blocks, :, meta.slot_offsets] = encode(k, kv_cache.dtype)
    v_cache[meta.slot_blocks, :, meta.slot_offsets] = encode(v, kv_cache.dtype)
    if triton_takes(q, kv_cache):
        from localmoe.layers.triton_attention import paged_attention as triton_paged_attention
        return triton_paged_attention(q, kv_cache, meta.token_tables, meta.token_context, scale, sliding_window,
                                      sinks)
    blocks = meta.block_tables.flatten()
    keys, values = (decode(c.index_select(0, blocks), q.dtype) for c in (k_cache, v_cache))  # [B * W, Hkv, S, D]
    mask = meta.mask(sliding_window)
    if meta.decode_only:
        return _decode_attention(q, keys, values, mask, scale, sinks)

    batch, width = meta.block_tables.shape
    _, num_kv_heads, block_size, head_dim = keys.shape

    def per_sequence(blocks_of: torch.Tensor) -> torch.Tensor:  # [B * W, Hkv, S, D] -> [B, Hkv, L, D]
        grouped = blocks_of.view(batch, width, num_kv_heads, block_size, head_dim).transpose(1, 2)
        return grouped.reshape(batch, num_kv_heads, width * block_size, head_dim)

    queries = q.new_zeros(batch, mask.shape[2], q.shape[1], head_dim)
    queries[meta.token_seq, meta.token_row] = q
    if sinks is None:
        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2), per_sequence(keys), per_sequence(values),
            attn_mask=mask, scale=scale, enable_gqa=num_kv_heads != q.shape[1],
        )
    else:
        out = _attention_with_sinks(queries.transpose(1, 2), per_sequence(keys), per_sequence(values), mask, scale,
                                    sinks)
    return out.transpose(1, 2)[meta.token_seq, meta.token_row]


def _kernel_takes(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether our decode kernel runs this layer: on CPU, a contiguous cache (bf16, float32 or fp8 rows), head dims
    16, 32, ..., 128."""
    head_dim = q.shape[-1]
    if not (head_dim % 16 == 0 and head_dim <= 128 and kv_cache.is_contiguous()):
        return False
    if kv_cache.dtype == FP8:
        return kv_cache.device.type == "cpu" and cpu_kernels.runs_here(q)
    return cpu_kernels.runs_here(q, kv_cache)


def triton_takes(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether the Triton kernel (layers/triton_attention.py) runs this layer: on CUDA, a cache in the model's
    dtype (fp8 rows keep the PyTorch path), blocks of a power-of-two size (the kernel's key tile)."""
    block_size = kv_cache.shape[3]
    return (triton_kernels.runs_here(q) and kv_cache.dtype != FP8 and kv_cache.stride(-1) == 1
            and block_size & (block_size - 1) == 0)


def _softmax(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the keys (last dim) of float32 scores; sinks, shaped to broadcast against
    scores[..., :1], join the denominator and are dropped from the result."""
    if sinks is None:
        return torch.softmax(scores, dim=-1)
    with_sinks = torch.cat([scores, sinks.float().expand_as(scores[..., :1])], dim=-1)
    return torch.softmax(with_sinks, dim=-1)[..., :-1]


def _attention_with_sinks(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                          scale: float, sinks: torch.Tensor) -> torch.Tensor:
    """SDPA's math with sinks: queries [B, H, Q, D], keys/values [B, Hkv, L, D], mask [B, 1, Q, L] -> [B, H, Q, D].
    Query head h reads key/value head h // G; the softmax runs in float32."""
    batch, num_heads, num_queries, head_dim = queries.shape
    num_kv_heads = keys.shape[1]
    grouped = queries.view(batch, num_kv_heads, num_heads // num_kv_heads, num_queries, head_dim)
    scores = torch.matmul(grouped, keys.unsqueeze(2).transpose(-1, -2)).float() * scale  # [B, Hkv, G, Q, L]
    scores.masked_fill_(~mask.unsqueeze(1), float("-inf"))
    probs = _softmax(scores, sinks.view(num_kv_heads, -1, 1, 1)).to(values.dtype)
    return torch.matmul(probs, values.unsqueeze(2)).view(batch, num_heads, num_queries, head_dim)


def _decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                      scale: float, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """One query per sequence: q [B, H, D], keys/values [B * W, Hkv, S, D] (each sequence's blocks in
    table order), mask [B, 1, 1, L] -> [B, H, D]. Query head h reads key/value head h // G. Scores are
    taken per block (one batched matmul over every (sequence, block, kv head)), the softmax runs in
    float32 over each sequence's whole row (and the sinks), and the per-block weighted values are summed."""
    batch, num_heads, head_dim = q.shape
    pairs, num_kv_heads, block_size, _ = keys.shape
    width, group = pairs // batch, num_heads // num_kv_heads
    per_block = q.view(batch, 1, num_kv_heads, group, head_dim).expand(batch, width, num_kv_heads, group, head_dim)
    per_block = per_block.reshape(-1, group, head_dim)
    scores = torch.bmm(per_block, keys.view(-1, block_size, head_dim).transpose(1, 2))  # [B*W*Hkv, G, S]
    scores = scores.view(batch, width, num_kv_heads, group, block_size).permute(0, 2, 3, 1, 4)
    scores = scores.reshape(batch, num_kv_heads, group, width * block_size).float() * scale
    scores.masked_fill_(~mask.view(batch, 1, 1, -1), float("-inf"))
    probs = _softmax(scores, None if sinks is None else sinks.view(num_kv_heads, group, 1))
    probs = probs.reshape(batch, num_kv_heads, group, width, block_size)
    probs = probs.permute(0, 3, 1, 2, 4).reshape(-1, group, block_size).to(values.dtype)
    out = torch.bmm(probs, values.view(-1, block_size, head_dim))  # [B*W*Hkv, G, D]
    return out.view(batch, width, num_heads, head_dim).sum(dim=1)

"""Attention over the paged KV cache.

Shapes: T tokens in the step's flat batch, B sequences, H query heads, Hkv key/value heads,
D head dim, N blocks in the pool, S block size, L = (blocks per sequence) * S keys per sequence.
Each step writes the new keys/values into their slots, then every sequence attends to the keys
of the blocks it owns (its block table), gathered into a padded [B, L] view. A step of decodes
only (one query per sequence) attends with two batched matmuls, which on CPU beats the SDPA
kernel several times over at that shape; steps with prompt chunks use SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat slot (block * S + offset) each new token's K/V goes to
    block_tables: torch.Tensor  # [B, blocks] block ids, padded with 0
    decode_only: bool  # every sequence has exactly one query this step
    token_seq: torch.Tensor  # [T] which sequence each token belongs to
    token_row: torch.Tensor  # [T] row of the token within its sequence's queries
    mask: torch.Tensor  # [B, 1, max_q, L] True where a query may attend to a key

    @staticmethod
    def build(
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        sliding_window: int | None,
        device: torch.device,
    ) -> "AttentionMetadata":
        """context_lens count every token a sequence has after this step (cached + new)."""
        q_lens = torch.tensor(query_lens, dtype=torch.long)
        ctx_lens = torch.tensor(context_lens, dtype=torch.long)
        width = max(len(t) for t in block_tables)
        tables = torch.zeros(len(block_tables), width, dtype=torch.long)
        for i, t in enumerate(block_tables):
            tables[i, : len(t)] = torch.tensor(t, dtype=torch.long)

        token_seq = torch.repeat_interleave(torch.arange(len(query_lens)), q_lens)
        starts = torch.cumsum(q_lens, 0) - q_lens
        token_row = torch.arange(int(q_lens.sum())) - starts[token_seq]
        positions = ctx_lens[token_seq] - q_lens[token_seq] + token_row
        blocks = tables[token_seq, positions // block_size]
        slot_mapping = blocks * block_size + positions % block_size

        max_q = int(q_lens.max())
        query_pos = (ctx_lens - q_lens)[:, None] + torch.arange(max_q)[None, :]  # [B, max_q]
        key_pos = torch.arange(width * block_size)[None, None, :]
        mask = (key_pos <= query_pos[:, :, None]) & (key_pos < ctx_lens[:, None, None])
        if sliding_window is not None:
            mask &= key_pos > query_pos[:, :, None] - sliding_window
        return AttentionMetadata(
            slot_mapping=slot_mapping.to(device),
            block_tables=tables.to(device),
            decode_only=max_q == 1,
            token_seq=token_seq.to(device),
            token_row=token_row.to(device),
            mask=mask.unsqueeze(1).to(device),
        )


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    kv_cache: torch.Tensor,  # [2, N, S, Hkv, D]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Store this step's K/V in the cache and attend; returns [T, H, D]."""
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k.to(kv_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v.to(kv_cache.dtype))

    batch, width = meta.block_tables.shape
    keys = k_cache.view(-1, block_size * num_kv_heads * head_dim).index_select(0, meta.block_tables.flatten())
    values = v_cache.view(-1, block_size * num_kv_heads * head_dim).index_select(0, meta.block_tables.flatten())
    keys = keys.view(batch, width * block_size, num_kv_heads, head_dim)
    values = values.view(batch, width * block_size, num_kv_heads, head_dim)
    if meta.decode_only:
        return _decode_attention(q, keys, values, meta.mask, scale)
    queries = q.new_zeros(batch, meta.mask.shape[2], q.shape[1], head_dim)
    queries[meta.token_seq, meta.token_row] = q
    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=meta.mask, scale=scale, enable_gqa=num_kv_heads != q.shape[1],
    )
    return out.transpose(1, 2)[meta.token_seq, meta.token_row]


def _decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """One query per sequence: q [B, H, D], keys/values [B, L, Hkv, D], mask [B, 1, 1, L] -> [B, H, D].
    Query head h reads key/value head h // (H / Hkv); scores and softmax in float32."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[2]
    grouped = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim).float()
    scores = torch.matmul(grouped, keys.permute(0, 2, 3, 1).float()) * scale  # [B, Hkv, G, L]
    scores.masked_fill_(~mask.view(batch, 1, 1, -1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(probs, values.transpose(1, 2)).view(batch, num_heads, head_dim)

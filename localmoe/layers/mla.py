"""Multi-head latent attention (DeepSeek-V2, DeepSeek-AI 2024) over the paged KV cache.

Shapes: T tokens, H heads, R latent width (kv_lora_rank), P rotary width (qk_rope_head_dim), C = R + P,
N and V a head's position-free key and value widths (qk_nope_head_dim, v_head_dim), B sequences,
L keys per sequence (its blocks, padded).

Every head's key and value are linear in one small latent per token, c = norm(x W_dkv) [R]; a rotary key
k_rope [P], shared by all heads, carries the position. The cache keeps just these, C numbers per token and
layer ([1, blocks, S, C]; with an fp8 cache, C e4m3 codes and the exponent of the entry's scale, [1, blocks, S,
C + 1]: layers/kv_cache_dtype.py), not the 2 H (N + P) numbers of expanded keys and values.

Head h's key is [W_uk_h c, k_rope] and its value W_uv_h c (kv_b_proj stacks W_uk_h over W_uv_h per head).
Steps with prompt chunks expand the cached latents into keys and values and attend with SDPA. Decode steps
absorb the up-projections instead: q_nope . (W_uk_h c) = (W_uk_h^T q_nope) . c, so each head's query moves into
latent space and scores the cached entries [c, k_rope] as they are (one key head of width C shared by all
heads), the weighted sum of the latents goes through W_uv_h afterwards, and no cached token is expanded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.layers.attention import AttentionMetadata
from localmoe.layers.kv_cache_dtype import decode, encode
from localmoe.layers.linear import Linear
from localmoe.layers.norm import RMSNorm
from localmoe.layers.rotary import rotary_embedding, yarn_mscale
from localmoe.models.args import ModelArgs


def softmax_scale(rope: dict, head_dim: int) -> float:
    """1/sqrt(d), times YaRN's temperature correction where the context is stretched. DeepSeek applies that
    correction to the whole score, position-free part included, so it lives here rather than in cos/sin (which
    reach only the rotary dims): mscale(factor, mscale_all_dim) once for the query and once for the key."""
    scale = head_dim**-0.5
    if rope["rope_type"] != "default" and rope.get("mscale_all_dim"):
        scale *= yarn_mscale(rope["factor"], rope["mscale_all_dim"]) ** 2
    return scale


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, args: ModelArgs, interleaved_rope: bool) -> None:
        super().__init__()
        d, bias = args.hidden_size, args.attention_bias
        self.num_heads = args.num_attention_heads
        self.latent_dim, self.rope_dim = args.kv_lora_rank, args.qk_rope_head_dim
        self.nope_dim, self.v_dim = args.qk_nope_head_dim, args.v_head_dim
        q_size = self.num_heads * (self.nope_dim + self.rope_dim)
        q_lora_rank = args.q_lora_rank
        self.low_rank_queries = bool(q_lora_rank)
        if q_lora_rank:  # queries through their own low-rank bottleneck
            self.q_a_proj = Linear(d, q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank)
            self.q_b_proj = Linear(q_lora_rank, q_size, bias=False)
        else:
            self.q_proj = Linear(d, q_size, bias=False)
        self.kv_a_proj_with_mqa = Linear(d, self.latent_dim + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.latent_dim)
        # stays row-major (never packed): decode steps read each head's W_uk_h and W_uv_h out of it
        self.kv_b_proj = nn.Linear(self.latent_dim, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(self.num_heads * self.v_dim, d, bias=bias)
        self.rotary = rotary_embedding(self.rope_dim, args.max_position_embeddings, args.rope, interleaved_rope)
        self.scale = softmax_scale(args.rope, self.nope_dim + self.rope_dim)
        self.sliding_window = None

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """What this layer keeps per cached token: the latent and the rotary key, [c, k_rope]."""
        return (1, num_blocks, block_size, self.latent_dim + self.rope_dim)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.low_rank_queries else self.q_proj(x)
        q_nope, q_rope = q.view(t, self.num_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.latent_dim, self.rope_dim], dim=-1)
        rotated = self.rotary(positions, torch.cat([q_rope, k_rope.unsqueeze(1)], dim=1))  # all heads and the key
        q_rope, k_rope = rotated.split([self.num_heads, 1], dim=1)

        cache = kv_cache[0]  # [blocks, S, C] (C + 1 in fp8)
        cache[meta.slot_blocks, meta.slot_offsets] = encode(
            torch.cat([self.kv_a_layernorm(latent), k_rope.squeeze(1)], dim=-1), cache.dtype)
        batch = meta.block_tables.shape[0]
        rows = cache.index_select(0, meta.block_tables.flatten()).view(batch, -1, cache.shape[-1])
        entries = decode(rows, q.dtype)  # [B, L, C]
        mask = meta.mask(None)  # [B, 1, max_q, L]
        if meta.decode_only:
            out = self._absorbed(q_nope, q_rope, entries, mask)
        else:
            out = self._expanded(q_nope, q_rope, entries, mask, meta)
        return self.o_proj(out.reshape(t, -1))

    def _head_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_uk [H, N, R] and W_uv [H, V, R], views of kv_b_proj."""
        per_head = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.latent_dim)
        return per_head.split([self.nope_dim, self.v_dim], dim=1)

    def _expanded(self, q_nope: torch.Tensor, q_rope: torch.Tensor, entries: torch.Tensor, mask: torch.Tensor,
                  meta: AttentionMetadata) -> torch.Tensor:
        """Every head's keys and values made from the cached latents, then SDPA over the padded queries; [T, H, V]."""
        batch, length, _ = entries.shape
        kv = self.kv_b_proj(entries[..., : self.latent_dim]).view(batch, length, self.num_heads, -1)
        k_nope, values = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_rope = entries[:, :, None, self.latent_dim:].expand(batch, length, self.num_heads, self.rope_dim)
        keys = torch.cat([k_nope, k_rope], dim=-1)
        queries = q_nope.new_zeros(batch, mask.shape[2], self.num_heads, self.nope_dim + self.rope_dim)
        queries[meta.token_seq, meta.token_row] = torch.cat([q_nope, q_rope], dim=-1)
        out = F.scaled_dot_product_attention(queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=mask, scale=self.scale)
        return out.transpose(1, 2)[meta.token_seq, meta.token_row]

    def _absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, entries: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
        """One query per sequence (T == B): queries in latent space score the cache entries directly; [B, H, V]."""
        w_uk, w_uv = self._head_projections()
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, R]
        query = torch.cat([q_latent, q_rope], dim=-1)  # [B, H, C]
        scores = torch.bmm(query, entries.transpose(1, 2)).float() * self.scale  # [B, H, L]
        scores.masked_fill_(~mask.view(scores.shape[0], 1, -1), float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(entries.dtype)
        latent_out = torch.bmm(probs, entries[..., : self.latent_dim])  # [B, H, R]
        return torch.bmm(latent_out.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)

"""Paged attention in Triton, reading each token's blocks where they lie in the pool (the block table, directly).

Shapes as in layers/attention.py: T tokens, H query heads, Hkv key/value heads, G = H / Hkv, D head dim, S block
size, W blocks per table; a layer's cache [2, N, Hkv, S, D].

One program per (token, key/value head): the G query heads of the group share every key and value block read
(GQA reads the cache once per group). A token is a row with its own number of keys (its position + 1, from
AttentionMetadata.token_context), so decode steps and mixed steps (several queries of one sequence, causal within
the step) are the same launch. The softmax is online over the blocks (running max and sum, float32), which is
how the sinks join it: a sink is one more logit whose value is zero, so it starts the running sum. A sliding
window starts the loop at the first block it reaches. Only the blocks below a token's context are read: entries
past them in the table (padding, holes) are never touched.

An fp8 cache (rows with their scales) and MLA's latent cache keep the PyTorch paths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs


@triton.jit
def _paged_attention_kernel(out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, context_ptr, sinks_ptr, scale,
                            window, stride_qt, stride_qh, stride_ot, stride_oh, stride_cn, stride_ch, stride_cs,
                            stride_tt, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SINKS: tl.constexpr):
    token = tl.program_id(0)
    kv_head = tl.program_id(1)
    group = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + group
    head_ok = group < GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_ptr + token * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)  # [G, D]
    num_keys = tl.load(context_ptr + token).to(tl.int32)
    first = tl.where(window > 0, tl.maximum(num_keys - window, 0), 0)  # the window's first key, else 0
    if HAS_SINKS:
        running_max = tl.load(sinks_ptr + heads, mask=head_ok, other=0.0).to(tl.float32)
        running_sum = tl.full((BLOCK_G,), 1.0, dtype=tl.float32)
    else:
        running_max = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
        running_sum = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    offsets = tl.arange(0, BLOCK_SIZE)
    for b in range(first // BLOCK_SIZE, tl.cdiv(num_keys, BLOCK_SIZE)):
        block = tl.load(tables_ptr + token * stride_tt + b).to(tl.int64)
        key_pos = b * BLOCK_SIZE + offsets
        key_ok = (key_pos < num_keys) & (key_pos >= first)
        rows = block * stride_cn + kv_head * stride_ch + offsets[:, None] * stride_cs + dims[None, :]
        row_mask = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_cache_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)  # [S, D]
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G, S]
        scores = tl.where(key_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        rescale = tl.exp(running_max - new_max)
        probs = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(probs, axis=1)
        v = tl.load(v_cache_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * rescale[:, None] + tl.sum(probs[:, :, None] * v[None, :, :], axis=1)
        running_max = new_max
    out = acc / running_sum[:, None]
    tl.store(out_ptr + token * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & dim_ok[None, :])


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, token_tables: torch.Tensor,
                    token_context: torch.Tensor, scale: float, sliding_window: int | None = None,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, D] against the cache [2, N, Hkv, S, D] (this step's keys and values already stored): token t reads
    the first token_context[t] keys of its table token_tables[t] [T, W] (within the window, with the sinks)."""
    num_tokens, num_heads, head_dim = q.shape
    _, _, num_kv_heads, block_size, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    q = q.contiguous()
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    # Triton's interpreter (the tests, on CPU) truncates float32 to bf16 where a GPU rounds to nearest: there the
    # kernel writes float32 and PyTorch rounds
    out = torch.empty_like(q, dtype=torch.float32 if knobs.runtime.interpret else q.dtype)
    tables = token_tables.contiguous()
    _paged_attention_kernel[(num_tokens, num_kv_heads)](
        out, q, k_cache, v_cache, tables, token_context.contiguous(), q if sinks is None else sinks, scale,
        sliding_window or 0, q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), tables.stride(0),
        GROUP=group, BLOCK_G=triton.next_power_of_2(group), BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), HAS_SINKS=sinks is not None)
    return out.to(q.dtype)

"""The fused MoE feed-forward in Triton (the design of vLLM's and SGLang's fused_moe, written for our layout).

Shapes: T tokens, K experts per token, P = T * K (token, expert) pairs, E experts, D hidden, I intermediate;
w13 [E, 2I, D] (gate rows over up rows), w2 [E, D, I], as GroupedExperts stacks them.

The pairs are sorted by expert and each expert's run is padded to a multiple of BLOCK_M rows, so every row block
of the grouped GEMM belongs to one expert and reads one expert's weights: only active experts are read, each once
per block of rows. Pairs routed nowhere (id -1) are left out of the runs. Two kernels: the gate and up
projections with SwiGLU fused (the intermediate [P, I] is written once, in the input's dtype), then the down
projection with the routing weight applied in its epilogue, into float32 pair rows that are summed per token.
The sort is built without reading anything back to the host (fixed-size buffers, the unused row blocks skip
themselves), so a step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

BLOCK_M = 16  # rows (pairs) per block: the smallest tl.dot takes, decode steps have few pairs per expert
BLOCK_N = 32  # output columns per program: narrow, so that a decode step's few active experts spread over every SM
BLOCK_K = 64


@triton.jit
def _gate_up_kernel(x_ptr, w13_ptr, h_ptr, pairs_ptr, block_expert_ptr, num_pairs, top_k, hidden, inter,
                    stride_x, stride_we, stride_wn, stride_h,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    expert = tl.load(block_expert_ptr + tl.program_id(0))
    if expert >= 0:
        pairs = tl.load(pairs_ptr + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = pairs < num_pairs
        tokens = pairs // top_k
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < inter
        w_rows = w13_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < hidden
            a = tl.load(x_ptr + tokens[:, None].to(tl.int64) * stride_x + ks[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & col_ok[None, :]
            w_gate = tl.load(w_rows + ks[:, None], mask=w_mask, other=0.0)  # [BLOCK_K, BLOCK_N]
            w_up = tl.load(w_rows + inter * stride_wn + ks[:, None], mask=w_mask, other=0.0)
            if UPCAST:
                a, w_gate, w_up = a.to(tl.float32), w_gate.to(tl.float32), w_up.to(tl.float32)
            gate = tl.dot(a, w_gate, gate, input_precision=PRECISION)
            up = tl.dot(a, w_up, up, input_precision=PRECISION)
        hidden_act = gate * tl.sigmoid(gate) * up
        tl.store(h_ptr + pairs[:, None].to(tl.int64) * stride_h + cols[None, :],
                 hidden_act.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w2_ptr, out_ptr, weights_ptr, pairs_ptr, block_expert_ptr, num_pairs, hidden, inter,
                 stride_h, stride_we, stride_wn, stride_out,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    expert = tl.load(block_expert_ptr + tl.program_id(0))
    if expert >= 0:
        pairs = tl.load(pairs_ptr + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = pairs < num_pairs
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < hidden
        w_rows = w2_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < inter
            a = tl.load(h_ptr + pairs[:, None].to(tl.int64) * stride_h + ks[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_rows + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        acc *= tl.load(weights_ptr + pairs, mask=row_ok, other=0.0)[:, None]
        tl.store(out_ptr + pairs[:, None].to(tl.int64) * stride_out + cols[None, :], acc,
                 mask=row_ok[:, None] & col_ok[None, :])


def sort_pairs(ids: torch.Tensor, num_experts: int, block_m: int = BLOCK_M) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs grouped by expert, each expert's run padded to a multiple of block_m (moe_align_block_size in
    vLLM): pair indices [R] (P marks padding and pairs routed nowhere) and the expert of each row block [R / block_m]
    (-1: no expert, the block does nothing). R is fixed by P, E and block_m alone: nothing is read back."""
    flat = ids.flatten()
    num_pairs = flat.numel()
    expert = torch.where(flat >= 0, flat, num_experts)  # pairs routed nowhere in a last bucket, never run
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=ids.device)
    counts.scatter_add_(0, expert, torch.ones_like(expert))
    padded = (counts + block_m - 1) // block_m * block_m
    padded[num_experts] = 0
    run_ends = torch.cumsum(padded, 0)
    order = torch.argsort(expert, stable=True)
    sorted_expert = expert[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_pairs, device=ids.device) - first_of_expert[sorted_expert]
    rows = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    dest = torch.where(sorted_expert < num_experts, run_ends[sorted_expert] - padded[sorted_expert] + rank, rows)
    pairs = torch.full((rows + 1,), num_pairs, dtype=torch.long, device=ids.device)
    pairs.scatter_(0, dest, order)
    block_starts = torch.arange(0, rows, block_m, device=ids.device)
    block_expert = torch.searchsorted(run_ends[:num_experts], block_starts, right=True)
    return pairs[:rows], torch.where(block_expert < num_experts, block_expert, -1)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor) -> torch.Tensor:
    """x [T, D], weights [T, K] float32, ids [T, K] (-1: routed nowhere) -> each token's experts mixed by its
    weights, [T, D] float32 (the caller rounds it once)."""
    num_tokens, top_k = ids.shape
    num_experts, two_inter, hidden = w13.shape
    inter = two_inter // 2
    num_pairs = num_tokens * top_k
    pairs, block_expert = sort_pairs(ids, num_experts)
    precision = "ieee" if x.dtype == torch.float32 else None  # float32 stays float32: no TF32 rounding
    # Triton's interpreter (the tests, on CPU) multiplies bf16 operands as raw bits: there they go through float32,
    # where bf16 numbers and their products are exact, so the interpreter computes what the GPU's bf16 dot does
    upcast = knobs.runtime.interpret and x.dtype != torch.float32
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    block_n = min(BLOCK_N, triton.next_power_of_2(inter))
    _gate_up_kernel[(block_expert.numel(), triton.cdiv(inter, block_n))](
        x, w13, h, pairs, block_expert, num_pairs, top_k, hidden, inter,
        x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=BLOCK_K, PRECISION=precision, UPCAST=upcast)
    out = torch.zeros(num_pairs, hidden, dtype=torch.float32, device=x.device)
    block_n = min(BLOCK_N, triton.next_power_of_2(hidden))
    _down_kernel[(block_expert.numel(), triton.cdiv(hidden, block_n))](
        h, w2, out, weights.float().contiguous().flatten(), pairs, block_expert, num_pairs, hidden, inter,
        h.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=BLOCK_K, PRECISION=precision, UPCAST=upcast)
    return out.view(num_tokens, top_k, hidden).sum(dim=1)

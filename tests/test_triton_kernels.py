"""The Triton kernels equal the PyTorch paths they replace on CUDA. Without a GPU they run in Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py) on CPU tensors; on a GPU they run compiled."""

from __future__ import annotations

import os

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from family_parity import engine, prompts_of, record_logits
from localmoe import SamplingParams
from localmoe.experts.gpu import TritonExperts
from localmoe.layers import attention, triton_attention, triton_kernels, triton_moe
from localmoe.layers.attention import AttentionMetadata
from localmoe.layers.moe import GroupedExperts, moe_blocks

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
assert DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1", "conftest.py sets the interpreter"

F32_TOL = 1e-5
BF16_FLOOR = 1e-2  # the suite's bf16 bar for kernels (test_cpu_kernels): no worse than PyTorch's bf16, or this


def assert_close(ours: torch.Tensor, pytorch: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> None:
    """float32: within F32_TOL of the PyTorch path; bf16: no further from float32 math on the same bf16 numbers
    than the PyTorch path is (or BF16_FLOOR)."""
    if dtype == torch.float32:
        assert (ours - pytorch).abs().max() <= F32_TOL
    else:
        error = (ours.float() - exact).abs().max()
        assert error <= max((pytorch.float() - exact).abs().max(), BF16_FLOOR), error


def random_experts(num_experts: int, hidden: int, inter: int, seed: int) -> GroupedExperts:
    torch.manual_seed(seed)
    experts = GroupedExperts(num_experts, hidden, inter)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.1)
    return experts.to(DEVICE)


def routing(tokens: int, top_k: int, num_experts: int, nowhere: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random distinct experts per token, `nowhere` pairs routed nowhere (id -1, weight 0)."""
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)])
    dropped = torch.randperm(tokens * top_k)[:nowhere]
    ids.view(-1)[dropped] = -1
    weights = torch.rand(tokens, top_k).masked_fill(ids < 0, 0)
    return weights.to(DEVICE), ids.to(DEVICE)


def test_sort_pairs_puts_each_routed_pair_once_in_its_experts_blocks():
    ids = torch.tensor([[2, 0], [2, -1], [-1, -1], [0, 2], [3, 2]], device=DEVICE)
    pairs, block_expert = triton_moe.sort_pairs(ids, num_experts=5, block_m=4)
    flat = ids.flatten()
    routed = pairs[pairs < flat.numel()]
    assert sorted(routed.tolist()) == [p for p in range(flat.numel()) if flat[p] >= 0]
    rows_expert = block_expert.repeat_interleave(4)
    assert torch.equal(flat[routed], rows_expert[pairs < flat.numel()])  # each pair in a block of its expert
    assert block_expert.tolist()[:3] == [0, 2, 3] and set(block_expert.tolist()[3:]) == {-1}  # 1, 4 idle


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,top_k,nowhere", [(1, 2, 0), (7, 2, 3), (37, 3, 10), (5, 2, 10)])
def test_fused_moe_equals_the_grouped_pytorch_path(dtype, tokens, top_k, nowhere):
    """Ragged runs per expert (one token to more than a row block), hidden and intermediate sizes that are not
    multiples of the kernel's tiles, pairs routed nowhere (the last case: every pair)."""
    experts = random_experts(6, hidden=48, inter=40, seed=tokens).to(dtype)
    weights, ids = routing(tokens, top_k, 6, nowhere)
    x = torch.randn(tokens, 48, device=DEVICE).to(dtype)
    with torch.inference_mode():
        ours = triton_moe.fused_moe(x, experts.w13, experts.w2, weights, ids)
        pytorch = experts(x, weights, ids)
        exact = random_experts(6, 48, 40, seed=tokens)
        exact.load_state_dict({k: v.float() for k, v in experts.state_dict().items()})
        exact = exact(x.float(), weights, ids)
    assert ours.dtype == torch.float32 and ours.shape == (tokens, 48)
    assert_close(ours, pytorch, exact, dtype)
    if nowhere == tokens * top_k:
        assert not ours.any()


def paged_step(query_lens: list[int], context_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
               dtype: torch.dtype, block_size: int = 4, num_blocks: int = 40):
    """A pool of random past keys/values, each sequence's blocks scattered over it, and this step's q, k, v."""
    torch.manual_seed(sum(context_lens))
    cache = torch.randn(2, num_blocks, num_kv_heads, block_size, head_dim, device=DEVICE).to(dtype)
    free = torch.randperm(num_blocks).tolist()
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in context_lens]
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block_size, DEVICE)
    tokens = sum(query_lens)
    q, k, v = (torch.randn(tokens, h, head_dim, device=DEVICE).to(dtype)
               for h in (num_heads, num_kv_heads, num_kv_heads))
    return cache, meta, q, k, v


def with_holes(token_tables: torch.Tensor, token_context: torch.Tensor, block_size: int) -> torch.Tensor:
    """Each token's table with every entry past its own blocks made garbage (-1, or a block far outside the
    pool): the kernel must read only the blocks below its token's context."""
    tables = token_tables.clone()
    used = (token_context + block_size - 1) // block_size
    past = torch.arange(tables.shape[1], device=tables.device)[None, :] >= used[:, None]
    garbage = torch.where(torch.arange(tables.numel(), device=tables.device).view_as(tables) % 2 == 0, -1, 10**9)
    return torch.where(past, garbage, tables)


STEPS = {
    "decode": ([1, 1, 1], [9, 1, 16]),
    "mixed": ([1, 5, 3, 1], [7, 5, 13, 22]),  # decodes, a whole prompt, a chunk continuing cached blocks
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("heads,kv_heads,head_dim,window,sinks", [
    (4, 2, 24, None, False), (3, 3, 16, 6, False), (8, 1, 32, None, True), (4, 2, 16, 3, True)])
def test_paged_attention_equals_the_pytorch_path(monkeypatch, dtype, step, heads, kv_heads, head_dim, window,
                                                  sinks):
    """GQA groups of 2, 1 and 8, a head dim that is not a power of two, decode and mixed steps, a sliding window,
    attention sinks; block tables with holes past each sequence's blocks."""
    query_lens, context_lens = STEPS[step]
    cache, meta, q, k, v = paged_step(query_lens, context_lens, heads, kv_heads, head_dim, dtype)
    sink_logits = torch.randn(heads, device=DEVICE) if sinks else None
    scale = head_dim ** -0.5
    monkeypatch.setattr(attention, "_kernel_takes", lambda *_: False)  # the PyTorch path, not the CPU kernel
    with torch.inference_mode():
        pytorch = attention.paged_attention(q, k, v, cache, meta, scale, window, sink_logits)  # stores k, v
        tables = with_holes(meta.token_tables, meta.token_context, meta.block_size)
        ours = triton_attention.paged_attention(q, cache, tables, meta.token_context, scale, window, sink_logits)
        exact = attention.paged_attention(q.float(), k.float(), v.float(), cache.float(), meta, scale, window,
                                          sink_logits)
    assert ours.dtype == dtype and ours.shape == q.shape
    assert_close(ours.float(), pytorch.float(), exact, dtype)


def compile_for_hopper(kernel, pointers: dict[str, str], constexprs: dict) -> bytes:
    """The kernel compiled for an H100 (sm_90) by Triton's own compiler, which needs no GPU: it checks what the
    interpreter does not (types across branches and loops, layouts, what lowers to PTX). Pointers are bf16 unless
    `pointers` says otherwise, other arguments int32 (`scale` float32)."""
    fn = JITFunction(kernel.fn)  # the Python function, also where the interpreter wraps it
    signature = {p.name: "constexpr" if p.is_constexpr else pointers.get(p.name) or
                 ("*bf16" if p.name.endswith("_ptr") else "fp32" if p.name == "scale" else "i32") for p in fn.params}
    return triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32)).asm["cubin"]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_the_kernels_compile_for_an_h100(dtype):
    moe_pointers = {name: "*i64" for name in ("pairs_ptr", "block_expert_ptr")}
    if dtype == "fp32":
        moe_pointers |= {name: "*fp32" for name in ("x_ptr", "w13_ptr", "h_ptr", "w2_ptr")}
    tiles = {"BLOCK_M": triton_moe.BLOCK_M, "BLOCK_N": triton_moe.BLOCK_N, "BLOCK_K": triton_moe.BLOCK_K,
             "PRECISION": "ieee" if dtype == "fp32" else None, "UPCAST": False}
    assert compile_for_hopper(triton_moe._gate_up_kernel, moe_pointers, tiles)
    assert compile_for_hopper(triton_moe._down_kernel, moe_pointers | {"out_ptr": "*fp32", "weights_ptr": "*fp32"},
                              tiles)
    attention_pointers = {"tables_ptr": "*i64", "context_ptr": "*i64"}
    if dtype == "fp32":
        attention_pointers |= {n: "*fp32" for n in ("out_ptr", "q_ptr", "k_cache_ptr", "v_cache_ptr", "sinks_ptr")}
    for group, sinks in ((1, False), (4, True)):
        assert compile_for_hopper(triton_attention._paged_attention_kernel, attention_pointers,
                                  {"GROUP": group, "BLOCK_G": group, "BLOCK_SIZE": 16, "HEAD_DIM": 64, "BLOCK_D": 64,
                                   "HAS_SINKS": sinks})


def test_a_model_served_on_the_triton_paths_gives_the_pytorch_logits(tiny_mixtral_dir, monkeypatch):
    """The wiring: where the kernels run (CUDA; here forced), every MoE layer's experts are TritonExperts and
    attention takes the kernel, and a batch of prompts then decodes with the PyTorch path's logits at every
    step."""
    prompts = [{"prompt_token_ids": p} for p in prompts_of([6, 11], seed=4)]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    runs, taken = [], []  # taken: what attention chose at each call, in the current run
    real_takes = attention.triton_takes
    monkeypatch.setattr(attention, "_kernel_takes", lambda *_: False)  # on CUDA the CPU kernel never runs
    monkeypatch.setattr(attention, "triton_takes", lambda *a: taken.append(real_takes(*a)) or taken[-1])
    for forced in (False, True):
        monkeypatch.setattr(triton_kernels, "runs_here", lambda t: forced)
        taken.clear()
        llm = engine(tiny_mixtral_dir, device=DEVICE.type)
        steps = record_logits(llm)
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        runs.append((tokens, torch.cat(steps)))
        experts = [type(moe.experts) for _, moe in moe_blocks(llm.engine.model)]
        assert (experts == [TritonExperts] * len(experts)) == forced
        assert taken and all(choice == forced for choice in taken)
    assert runs[0][0] == runs[1][0]
    assert (runs[0][1] - runs[1][1]).abs().max() <= 1e-4

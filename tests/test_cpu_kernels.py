"""Our CPU kernels (layers/*_cpu.cpp) against the float32 math they replace."""

from __future__ import annotations

from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F

from localmoe.experts.cpu import OneDNNExperts, TiledExperts
from localmoe.experts.observer import RoutingObserver
from localmoe.experts.runtime import convert_experts
from localmoe.layers import cpu_kernels
from localmoe.layers.attention import AttentionMetadata, paged_attention
from localmoe.layers.cpu_kernels import cpu_has_avx512_bf16, expert_tiles, fused_moe, kernels, to_tiles
from localmoe.layers.kv_cache_dtype import FP8
from localmoe.layers.linear import Linear
from localmoe.layers.moe import SparseMoE
from localmoe.layers.norm import RMSNorm
from localmoe.layers.routing import softmax_topk

pytestmark = [pytest.mark.avx512_bf16,
              pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="needs a CPU with AVX512-BF16")]


def reference(x, ids, weights, w13, w2):
    """The MoE feed-forward in float32 from the same bf16 numbers, token by token."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            gate, up = (w13[ids[t, k]].float() @ x[t].float()).chunk(2)
            out[t] += weights[t, k] * (w2[ids[t, k]].float() @ (F.silu(gate) * up))
    return out


def test_tiles_put_column_pairs_of_each_run_of_64_rows_side_by_side():
    weight = torch.arange(80 * 6, dtype=torch.int16).view(80, 6)  # a full tile of 64 rows, then one of 16
    tiles = to_tiles(weight)
    assert tiles.shape == weight.shape
    first, second = tiles[:64].flatten(), tiles[64:].flatten()
    # element (row r, column c) of a tile of n rows sits at (c // 2) * 2n + 2r + c % 2
    for r in range(80):
        tile, n, row = (first, 64, r) if r < 64 else (second, 16, r - 64)
        assert [int(tile[(c // 2) * 2 * n + 2 * row + c % 2]) for c in range(6)] == weight[r].tolist()
    stacked = torch.stack([weight, weight + 1000])  # leading dimensions: each matrix on its own
    assert torch.equal(to_tiles(stacked)[1], to_tiles(weight + 1000))


@pytest.mark.parametrize("tokens,hidden,inter", [(1, 64, 96), (5, 80, 48), (19, 128, 256), (40, 144, 80)])
def test_kernel_is_no_less_accurate_than_pytorch_bf16(tokens, hidden, inter):
    """Shapes include tiles of fewer than 64 rows (hidden 80 and 144; 16 units after full tiles of 32: inter 48,
    80) and more than six tokens per expert (several passes over a tile)."""
    assert kernels() is not None  # the compiler and headers are there: building must work
    torch.manual_seed(tokens)
    moe = SparseMoE(hidden, inter, num_experts=4, top_k=2).to(torch.bfloat16)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(tokens, hidden).to(torch.bfloat16)
    with torch.inference_mode():
        weights, ids = softmax_topk(moe.gate(x), 2, True)
        expected = reference(x, ids, weights, moe.experts.w13, moe.experts.w2)
        ours = fused_moe(x, ids, weights, *expert_tiles(moe.experts.w13, moe.experts.w2)).float()
        pytorch = moe.experts(x, weights, ids).float()
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() <= max((pytorch - expected).abs().max(), 1e-2)


def test_top2_pairs_summed_in_two_calls_equal_one_call():
    """The expert cache runs a step's experts in waves and adds their float32 sums (experts/offload.py): for
    top-2, whichever wave holds which of a token's experts, the result is the one call's bit for bit."""
    torch.manual_seed(5)
    w13, w2 = (0.05 * torch.randn(8, 1024, 256)).bfloat16(), (0.05 * torch.randn(8, 256, 512)).bfloat16()
    tiles = expert_tiles(w13, w2)
    x = torch.randn(64, 256).bfloat16()
    weights, ids = torch.rand(64, 2), torch.stack([torch.randperm(8)[:2] for _ in range(64)])
    first_wave = ids < 4  # experts 0-3 in one wave, 4-7 in the other: most tokens' pairs are split
    waves = [torch.where(first_wave, ids, -1), torch.where(first_wave, -1, ids)]
    split = sum(fused_moe(x, wave, weights, *tiles, float_out=True) for wave in waves)
    assert torch.equal(split.to(BF16), fused_moe(x, ids, weights, *tiles))
    assert torch.equal(split, fused_moe(x, ids, weights, *tiles, float_out=True))


def test_a_pair_routed_nowhere_adds_nothing():
    torch.manual_seed(0)
    w13, w2 = (0.1 * torch.randn(4, 192, 64)).bfloat16(), (0.1 * torch.randn(4, 64, 96)).bfloat16()
    tiles = expert_tiles(w13, w2)
    x, weights = torch.randn(3, 64).bfloat16(), torch.rand(3, 2)
    ids = torch.tensor([[0, 2], [1, 3], [2, 0]])
    nowhere = ids.clone()
    nowhere[1, 0] = -1
    zeroed = weights.clone()
    zeroed[1, 0] = 0
    assert torch.equal(fused_moe(x, nowhere, weights, *tiles), fused_moe(x, ids, zeroed, *tiles))
    assert not torch.equal(fused_moe(x, nowhere, weights, *tiles), fused_moe(x, ids, weights, *tiles))


def test_packed_bf16_experts_are_tiled_and_every_step_runs_the_kernel():
    moe = SparseMoE(64, 96, num_experts=4, top_k=2).to(torch.bfloat16)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(200, 64).to(torch.bfloat16)
    grouped = RoutingObserver(moe)
    with torch.inference_mode():
        expected = moe(x).float()
        grouped.end_step()
        convert_experts(moe, torch.device("cpu"), packing=True)
        assert isinstance(moe.experts, TiledExperts)
        tiled = RoutingObserver(moe)  # observers watch the experts module the model has when they attach
        with patch("localmoe.experts.cpu.fused_moe", wraps=fused_moe) as kernel:
            ours = moe(x).float()
            tiled.end_step()
            moe(x[:3])
            tiled.end_step()
        routed = [torch.bincount(moe.route(x)[1].flatten(), minlength=4) for x in (x, x, x[:3])]
    assert kernel.call_count == 2
    # the ids routed to the grouped experts and to the kernel are seen alike
    counted = grouped.tokens[0] + tiled.tokens[0]
    assert torch.equal(counted, sum(routed)) and int(counted.sum()) == 2 * 403
    assert (ours - expected).abs().max() <= 0.02 * expected.abs().max()


def test_float32_experts_keep_the_onednn_layout():
    moe = SparseMoE(64, 96, num_experts=4, top_k=2)
    convert_experts(moe, torch.device("cpu"), packing=True)
    assert isinstance(moe.experts, OneDNNExperts) and moe.experts.packed[0][0].is_mkldnn


def dense_decode_attention(q, kv_cache, tables, lens, scale, window, sinks):
    """One query per sequence against its keys gathered in order, in float32, with sinks and a window."""
    batch, heads, dim = q.shape
    kv_heads, block_size = kv_cache.shape[2], kv_cache.shape[3]
    out = torch.empty(batch, heads, dim)
    for b in range(batch):
        n = int(lens[b])
        pos = torch.arange(n)
        keys, values = (kv_cache[i][tables[b][pos // block_size], :, pos % block_size].float() for i in (0, 1))
        first = max(0, n - window) if window else 0
        for h in range(heads):
            kh = h // (heads // kv_heads)
            scores = (keys[first:, kh] @ q[b, h].float()) * scale
            if sinks is not None:
                scores = torch.cat([scores, sinks[h:h + 1].float()])
            probs = torch.softmax(scores, 0)[: n - first]
            out[b, h] = probs @ values[first:, kh]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,with_sinks", [(0, False), (5, False), (0, True)])
def test_decode_attention_reads_the_paged_cache(dtype, window, with_sinks):
    """Sequences of different lengths over scattered blocks, grouped query heads, q/k/v strided; the new key and
    value land in their slot, and the output is float32 attention over each sequence's own keys."""
    g = torch.Generator().manual_seed(window + with_sinks)
    blocks, kv_heads, block_size, dim, heads = 12, 2, 4, 16, 6
    cache = torch.randn(2, blocks, kv_heads, block_size, dim, generator=g).to(dtype)
    tables = torch.tensor([[3, 7, 1, 0], [9, 2, 0, 0], [5, 11, 4, 8]])
    lens = torch.tensor([10, 5, 16])
    # views into one merged projection, as a layer passes them: rows at a stride of all heads
    q, k, v = torch.randn(3, heads + 2 * kv_heads, dim, generator=g).to(dtype).split([heads, kv_heads, kv_heads], 1)
    assert not q.is_contiguous()
    sinks = torch.randn(heads, generator=g) if with_sinks else None
    ours = kernels().paged_attention(q, k, v, cache, tables, lens, 0.25, window, sinks)
    last = lens - 1
    for b in range(3):
        block, offset = tables[b, last[b] // block_size], last[b] % block_size
        assert torch.equal(cache[0, block, :, offset], k[b]) and torch.equal(cache[1, block, :, offset], v[b])
    expected = dense_decode_attention(q, cache, tables, lens, 0.25, window, sinks)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert (ours.float() - expected).abs().max() <= tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_rounds_like_the_reference(dtype):
    """The normalised row is rounded to the input dtype before the weight multiplies it, as transformers does."""
    torch.manual_seed(0)
    norm = RMSNorm(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x, residual = torch.randn(7, 3, 96).to(dtype), torch.randn(7, 3, 96).to(dtype)
    with torch.inference_mode():
        ours = norm(x)
        added, stream = norm.add(x, residual)

    def reference(x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return norm.weight * (x.float() * torch.rsqrt(variance + 1e-5)).to(dtype)

    tolerance = {"atol": 1e-6 if dtype == torch.float32 else 1e-2, "rtol": 1e-5}
    assert ours.shape == x.shape
    assert torch.allclose(ours.float(), reference(x).float(), **tolerance)
    # with the residual: the stream is x + residual as PyTorch rounds it, and the norm is of that stream
    assert torch.equal(stream, x + residual)
    assert torch.allclose(added.float(), reference(x + residual).float(), **tolerance)


@pytest.mark.parametrize("rows", [1, 5, 130])
def test_packed_bf16_linear_runs_the_kernel_on_tiles(rows):
    """After packing, a bf16 layer (here 200 outputs: 3 full tiles and one of 8 rows padded to 16) answers from
    our kernel at every batch size; it agrees with float32 math on the same bf16 numbers."""
    torch.manual_seed(rows)
    layer = Linear(80, 200, bias=True).to(torch.bfloat16)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer.pack()
    assert layer.tiled and layer.weight.shape == (208, 80) and torch.equal(layer.weight[:192], to_tiles(weight[:192]))
    x = torch.randn(rows, 80).to(torch.bfloat16)
    with torch.inference_mode():
        ours = layer(x).float()
    expected = x.float() @ weight.float().T + bias.float()
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() <= 0.05 * expected.abs().max()


@pytest.mark.parametrize("window,with_sinks", [(None, False), (3, False), (None, True)])
def test_a_step_with_prompt_chunks_runs_the_kernel_like_the_pytorch_path(monkeypatch, window, with_sinks):
    """Decodes and prompt chunks (one continuing cached tokens) in one kernel call, a row per token: the result
    and the cache writes equal the PyTorch path's (SDPA with every sequence padded to the longest chunk, or the
    explicit softmax with sinks), within the sliding window if any."""
    g = torch.Generator().manual_seed(3)
    query_lens, context_lens = [1, 5, 1, 3], [10, 12, 3, 3]
    tables = [[4, 2, 9], [1, 7, 3, 8], [6], [5]]
    meta = AttentionMetadata.build(query_lens, context_lens, tables, 4, torch.device("cpu"))
    assert meta.token_context.tolist() == [10, 8, 9, 10, 11, 12, 3, 1, 2, 3]
    cache = torch.randn(2, 10, 2, 4, 16, generator=g)
    q, k, v = (torch.randn(10, n, 16, generator=g) for n in (4, 2, 2))
    sinks = torch.randn(4, generator=g) if with_sinks else None
    reference_cache = cache.clone()
    calls = []

    class Counting:  # the extension, counting its attention calls
        def __getattr__(self, name):
            if name == "paged_attention":
                calls.append(name)
            return getattr(kernels(), name)

    monkeypatch.setattr(cpu_kernels, "kernels", Counting)
    ours = paged_attention(q, k, v, cache, meta, 0.25, window, sinks)
    assert calls == ["paged_attention"]  # one call for the whole step
    monkeypatch.setattr(cpu_kernels, "runs_here", lambda *tensors: False)
    expected = paged_attention(q, k, v, reference_cache, meta, 0.25, window, sinks)
    assert torch.allclose(ours, expected, atol=1e-5) and torch.equal(cache, reference_cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 40])
def test_rotary_kernel_equals_the_pytorch_path(dtype, head_dim):
    """On the query and key heads of a merged projection (rows at a stride), with random tables: the kernel's
    output is bit for bit x * cos + roll(x) * signed_sin as PyTorch computes and rounds it (head dim 64 in
    vector lanes, 40 element by element)."""
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(5, 8 + 2 * 4, head_dim, generator=g).to(dtype)
    x = qkv[:, :12]  # 8 query heads and 4 key heads, as Attention passes them
    cos, signed_sin = (torch.randn(5, 1, head_dim, generator=g).to(dtype) for _ in range(2))
    with torch.inference_mode():
        ours = kernels().rotary(x, cos.squeeze(1), signed_sin.squeeze(1))
    expected = torch.addcmul(x * cos, x.roll(head_dim // 2, dims=-1), signed_sin)
    assert ours.shape == expected.shape and ours.is_contiguous()
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("rows,vocab", [(1, 32000), (16, 1000), (3, 37)])
def test_argmax_kernel_picks_the_first_largest_like_pytorch(rows, vocab):
    logits = torch.randn(rows, vocab)
    logits[0, vocab // 3] = logits[0, vocab - 1] = logits[0].max() + 1  # a tie: the first one wins
    if rows > 1:
        logits[1, -1] = 100.0  # in the tail past the last full 16 lanes
    assert torch.equal(kernels().argmax_rows(logits), logits.argmax(dim=-1))
    assert int(kernels().argmax_rows(logits)[0]) == vocab // 3


BF16 = torch.bfloat16


def test_an_empty_batch_gives_empty_results_without_calling_a_kernel(monkeypatch):
    """The wrappers answer zero rows themselves (a prompt-chunk step where nothing samples runs none)."""
    tiles = cpu_kernels.linear_tiles(torch.randn(200, 80).to(BF16))
    w13, w2 = expert_tiles(torch.randn(4, 192, 64).to(BF16), torch.randn(4, 64, 96).to(BF16))
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: pytest.fail("a kernel was called on an empty batch"))
    out = cpu_kernels.tiled_linear(torch.empty(0, 80, dtype=BF16), tiles, 200)
    assert out.shape == (0, 200) and out.dtype == BF16
    no_pairs = torch.empty(0, 2, dtype=torch.long), torch.empty(0, 2)
    out = fused_moe(torch.empty(0, 64, dtype=BF16), *no_pairs, w13, w2)
    assert out.shape == (0, 64) and out.dtype == BF16
    assert fused_moe(torch.empty(0, 64, dtype=BF16), *no_pairs, w13, w2, float_out=True).dtype == torch.float32
    tokens = cpu_kernels.argmax(torch.empty(0, 263))
    assert tokens.shape == (0,) and tokens.dtype == torch.long
    assert to_tiles(torch.empty(0, 6, dtype=BF16)).shape == (0, 6)


def attention_args(batch=2, **change):
    """Valid paged_attention arguments (2 kv heads, blocks of 4, head dim 16, 4 query heads); `change` replaces
    some of them."""
    args = dict(q=torch.randn(batch, 4, 16), k=torch.randn(batch, 2, 16), v=torch.randn(batch, 2, 16),
                kv_cache=torch.zeros(2, 6, 2, 4, 16), block_tables=torch.tensor([[0, 1], [2, 3]])[:batch],
                context_lens=torch.tensor([5, 8])[:batch], scale=0.25, window=0, sinks=None)
    return list({**args, **change}.values())


def moe_args(tokens=3, **change):
    """Valid fused_moe arguments: 4 experts of 96 units (zero: the same in tiles), hidden size 64, top-2."""
    args = dict(x=torch.randn(tokens, 64).to(BF16), ids=torch.zeros(tokens, 2, dtype=torch.long),
                weights=torch.ones(tokens, 2), w13=torch.zeros(4, 192, 64, dtype=BF16),
                w2=torch.zeros(4, 64, 96, dtype=BF16), float_out=False)
    return list({**args, **change}.values())


def linear_args(tokens=3, **change):
    """Valid tiled_linear arguments: 200 outputs (tiles padded to 208 rows), 80 inputs."""
    args = dict(x=torch.randn(tokens, 80).to(BF16), w=torch.zeros(208, 80, dtype=BF16), n=200)
    return list({**args, **change}.values())


def norm_args(rows=3, **change):
    args = dict(x=torch.randn(rows, 96), residual=None, weight=torch.ones(96), eps=1e-5)
    return list({**args, **change}.values())


def rotary_args(tokens=3, **change):
    args = dict(x=torch.randn(tokens, 6, 64), cos=torch.randn(tokens, 64), signed_sin=torch.randn(tokens, 64))
    return list({**args, **change}.values())


@pytest.mark.parametrize("name,args,shape", [
    ("argmax_rows", [torch.empty(0, 263)], (0,)),
    ("tiled_linear", linear_args(0), (0, 200)),
    ("fused_moe", moe_args(0), (0, 64)),
    ("paged_attention", attention_args(0), (0, 4, 16)),
    ("paged_attention", attention_args(0, kv_cache=torch.zeros(2, 6, 2, 4, 17, dtype=FP8)), (0, 4, 16)),
    ("rms_norm", norm_args(0), (0, 96)),
    ("rms_norm", norm_args(0, residual=torch.empty(0, 96)), (0, 96)),
    ("rotary", rotary_args(0), (0, 6, 64)),
    ("to_tiles", [torch.empty(0, 2, 6, dtype=BF16)], (0, 2, 6)),
], ids=lambda value: value if isinstance(value, str) else None)
def test_each_kernel_called_with_an_empty_batch_returns_an_empty_result(name, args, shape):
    """The layers outside this module call some kernels directly (attention, norms, rotary): zero rows work."""
    out = getattr(kernels(), name)(*args)
    for tensor in out if isinstance(out, list) else [out]:
        assert tensor.shape == shape


@pytest.mark.parametrize("name,args", [
    ("argmax_rows", [torch.randn(3, 263)]),
    ("tiled_linear", linear_args()),
    ("fused_moe", moe_args()),
    ("paged_attention", attention_args()),
    ("paged_attention", attention_args(kv_cache=torch.zeros(2, 6, 2, 4, 17, dtype=FP8))),
    ("rms_norm", norm_args()),
    ("rotary", rotary_args()),
    ("to_tiles", [torch.randn(64, 6).to(BF16)]),
], ids=lambda value: value if isinstance(value, str) else None)
def test_the_arguments_the_refusals_start_from_are_taken(name, args):
    getattr(kernels(), name)(*args)


BAD_CALLS = {
    "argmax_rows: 1-D": ("argmax_rows", [torch.randn(263)]),
    "argmax_rows: float64": ("argmax_rows", [torch.randn(3, 263, dtype=torch.float64)]),
    "argmax_rows: empty vocabulary": ("argmax_rows", [torch.empty(3, 0)]),
    "tiled_linear: 1-D x": ("tiled_linear", linear_args(x=torch.randn(80).to(BF16))),
    "tiled_linear: inner sizes differ": ("tiled_linear", linear_args(x=torch.randn(3, 64).to(BF16))),
    "tiled_linear: more outputs than rows": ("tiled_linear", linear_args(n=220)),
    "tiled_linear: rows not n rounded up": ("tiled_linear", linear_args(n=100)),
    "tiled_linear: float32 x": ("tiled_linear", linear_args(x=torch.randn(3, 80))),
    "tiled_linear: 3-D weight": ("tiled_linear", linear_args(w=torch.zeros(2, 208, 80, dtype=BF16))),
    "fused_moe: 1-D x": ("fused_moe", moe_args(x=torch.randn(64).to(BF16))),
    "fused_moe: ids for other tokens": ("fused_moe", moe_args(ids=torch.zeros(2, 2, dtype=torch.long))),
    "fused_moe: weights and ids differ": ("fused_moe", moe_args(weights=torch.ones(3, 1))),
    "fused_moe: float ids": ("fused_moe", moe_args(ids=torch.zeros(3, 2))),
    "fused_moe: expert id out of range": ("fused_moe", moe_args(ids=torch.full((3, 2), 4))),
    "fused_moe: hidden sizes differ": ("fused_moe", moe_args(x=torch.randn(3, 48).to(BF16))),
    "fused_moe: w2 of other experts": ("fused_moe", moe_args(w2=torch.zeros(3, 64, 96, dtype=BF16))),
    "fused_moe: 2-D w13": ("fused_moe", moe_args(w13=torch.zeros(192, 64, dtype=BF16))),
    "fused_moe: float32 x": ("fused_moe", moe_args(x=torch.randn(3, 64))),
    "paged_attention: 4-D cache": ("paged_attention", attention_args(kv_cache=torch.zeros(2, 6, 2, 4))),
    "paged_attention: no kv heads": ("paged_attention", attention_args(kv_cache=torch.zeros(2, 6, 0, 4, 16))),
    "paged_attention: heads not a multiple": ("paged_attention", attention_args(q=torch.randn(2, 3, 16))),
    "paged_attention: head dim 8": ("paged_attention", attention_args(
        q=torch.randn(2, 4, 8), k=torch.randn(2, 2, 8), v=torch.randn(2, 2, 8), kv_cache=torch.zeros(2, 6, 2, 4, 8))),
    "paged_attention: head dim 0": ("paged_attention", attention_args(
        q=torch.randn(2, 4, 0), k=torch.randn(2, 2, 0), v=torch.randn(2, 2, 0), kv_cache=torch.zeros(2, 6, 2, 4, 0))),
    "paged_attention: k of other rows": ("paged_attention", attention_args(k=torch.randn(1, 2, 16))),
    "paged_attention: 2-D q": ("paged_attention", attention_args(q=torch.randn(2, 64))),
    "paged_attention: tables of other rows": ("paged_attention", attention_args(block_tables=torch.tensor([[0, 1]]))),
    "paged_attention: keys past the table": ("paged_attention", attention_args(context_lens=torch.tensor([5, 9]))),
    "paged_attention: no keys": ("paged_attention", attention_args(context_lens=torch.tensor([0, 8]))),
    "paged_attention: block outside the cache": ("paged_attention", attention_args(
        block_tables=torch.tensor([[0, 6], [2, 3]]))),
    "paged_attention: negative block": ("paged_attention", attention_args(block_tables=torch.tensor([[0, -1], [2, 3]]))),
    "paged_attention: float tables": ("paged_attention", attention_args(block_tables=torch.zeros(2, 2))),
    "paged_attention: sinks of other heads": ("paged_attention", attention_args(sinks=torch.zeros(3))),
    "paged_attention: float16 cache": ("paged_attention", attention_args(
        kv_cache=torch.zeros(2, 6, 2, 4, 16, dtype=torch.float16))),
    "paged_attention: fp8 rows without their exponent": ("paged_attention", attention_args(
        kv_cache=torch.zeros(2, 6, 2, 4, 16, dtype=FP8))),
    "paged_attention: float16 q over an fp8 cache": ("paged_attention", attention_args(
        q=torch.randn(2, 4, 16, dtype=torch.float16), kv_cache=torch.zeros(2, 6, 2, 4, 17, dtype=FP8))),
    "rms_norm: weight of another size": ("rms_norm", norm_args(weight=torch.ones(64))),
    "rms_norm: 0-D x": ("rms_norm", norm_args(x=torch.tensor(1.0))),
    "rms_norm: empty rows": ("rms_norm", norm_args(x=torch.empty(3, 0), weight=torch.empty(0))),
    "rms_norm: int64 x": ("rms_norm", norm_args(x=torch.ones(3, 96, dtype=torch.long))),
    "rms_norm: residual of another shape": ("rms_norm", norm_args(residual=torch.randn(2, 96))),
    "rotary: 2-D x": ("rotary", rotary_args(x=torch.randn(3, 64))),
    "rotary: tables of other tokens": ("rotary", rotary_args(cos=torch.randn(2, 64))),
    "rotary: flat tables": ("rotary", rotary_args(cos=torch.randn(3 * 64), signed_sin=torch.randn(3 * 64))),
    "rotary: empty rows": ("rotary", rotary_args(x=torch.randn(3, 6, 0), cos=torch.randn(3, 0),
                                                 signed_sin=torch.randn(3, 0))),
    "rotary: tables in another dtype": ("rotary", rotary_args(cos=torch.randn(3, 64).to(BF16))),
    "to_tiles: odd columns": ("to_tiles", [torch.randn(64, 5).to(BF16)]),
    "to_tiles: 1-D": ("to_tiles", [torch.randn(64).to(BF16)]),
    "to_tiles: float32": ("to_tiles", [torch.randn(64, 6)]),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_each_kernel_refuses_shapes_it_cannot_take_with_an_exception(case):
    """A Python RuntimeError, before any memory is read: never a signal that takes the server down."""
    name, args = BAD_CALLS[case]
    with pytest.raises(RuntimeError):
        getattr(kernels(), name)(*args)


def test_a_step_of_prompt_chunks_where_nothing_samples_runs_on_the_bf16_kernels(tiny_mixtral_dir, monkeypatch):
    """A prompt longer than the step's token budget: its first steps are chunks that end before the prompt does,
    so no sequence samples and the output head must not run on zero rows (it had died of SIGFPE in tiled_linear).
    The greedy tokens equal those of the same prompt in one step."""
    from localmoe import LLM, SamplingParams

    prompt = {"prompt_token_ids": [(7 * i) % 250 + 3 for i in range(40)]}
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    whole, chunked = (LLM(model=str(tiny_mixtral_dir), dtype="bfloat16", kv_cache_memory=2**23,
                          max_num_batched_tokens=budget) for budget in (512, 16))
    assert chunked.engine.model.lm_head.tiled  # the bf16 kernel path
    sampled = []
    execute = chunked.engine.runner.execute

    def recording(batch):
        logits = execute(batch)
        sampled.append(tuple(logits.sample.shape))
        return logits

    monkeypatch.setattr(chunked.engine.runner, "execute", recording)
    ours = chunked.generate(prompt, params)[0].outputs[0].token_ids
    vocab = chunked.engine.model.lm_head.out_features
    assert sampled[:3] == [(0, vocab), (0, vocab), (1, vocab)]
    assert ours == whole.generate(prompt, params)[0].outputs[0].token_ids

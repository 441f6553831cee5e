"""Our CPU MoE kernel (layers/fused_moe_cpu.cpp) against the float32 math it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from localmoe.layers.fused_moe import cpu_has_avx512_bf16, fused_moe, kernel
from localmoe.layers.moe import SparseMoE
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


@pytest.mark.parametrize("tokens,hidden,inter", [(1, 64, 96), (5, 80, 48), (19, 128, 256)])
def test_kernel_is_no_less_accurate_than_pytorch_bf16(tokens, hidden, inter):
    """Shapes include rows that are not a multiple of 32 (the masked tail) and more than 8 tokens
    per expert (several passes)."""
    assert kernel() is not None  # the compiler and headers are there: building must work
    torch.manual_seed(tokens)
    moe = SparseMoE(hidden, inter, num_experts=4, top_k=2).to(torch.bfloat16)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(tokens, hidden).to(torch.bfloat16)
    with torch.inference_mode():
        weights, ids = softmax_topk(moe.gate(x), 2, True)
        expected = reference(x, ids, weights, moe.w13, moe.w2)
        ours = fused_moe(x, ids, weights, moe.w13, moe.w2).float()
        pytorch = moe.mix(weights, moe.pair_outputs(x, ids)).float()
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() <= max((pytorch - expected).abs().max(), 1e-2)


def test_decode_steps_run_the_kernel_and_prefill_does_not():
    moe = SparseMoE(64, 96, num_experts=4, top_k=2).to(torch.bfloat16)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
    moe.pack()
    assert moe.packed is None  # bf16 experts stay row-major for the kernel
    with torch.inference_mode():
        moe(torch.randn(3, 64).to(torch.bfloat16))
        assert moe.fused_calls == 1
        moe(torch.randn(200, 64).to(torch.bfloat16))
        assert moe.fused_calls == 1
    assert int(moe.tokens_per_expert.sum()) == 2 * 203

"""The fused decoder (layers/fused_decoder.py): every decoder layer of a step in one kernel call, for models of
Mixtral's shape in bf16, giving exactly what the model's modules give."""

from __future__ import annotations

import pytest

from checkpoints import make_checkpoint
from localmoe import LLM, SamplingParams
from localmoe.layers import cpu_kernels
from localmoe.layers.cpu_kernels import cpu_has_avx512_bf16

pytestmark = [pytest.mark.avx512_bf16,
              pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="needs a CPU with AVX512-BF16")]

PROMPTS = [{"prompt_token_ids": [(7 * i + 3 * n) % 250 + 3 for i in range(n)]} for n in (5, 40, 17, 23)]


def outputs(llm: LLM) -> list[tuple]:
    """Greedy tokens with their top-5 logprobs, then sampled ones (seeded), of a batch whose prompts are computed in
    chunks beside other sequences' decodes."""
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=5)
    sampled = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    return [(c.token_ids, c.logprobs) for params in (greedy, sampled)
            for out in llm.generate(PROMPTS, params) for c in out.outputs]


@pytest.mark.parametrize("window, quantization", [(None, None), (8, None), (None, "int4"), (None, "int8"),
                                                  (None, "fp8")])
def test_the_fused_layers_give_what_the_modules_give_bit_for_bit(tmp_path, monkeypatch, window, quantization):
    """bf16 and quantized at load (every linear layer and the experts), with and without a sliding window."""
    directory = make_checkpoint(tmp_path, "mixtral", seed=3, sliding_window=window)
    llm = LLM(model=str(directory), dtype="bfloat16", max_num_batched_tokens=32, max_num_seqs=4,
              enable_prefix_caching=False, kv_cache_memory=2**22, quantization=quantization)
    assert llm.engine.runner.fused is not None
    calls, built = [], cpu_kernels.kernels()

    class Counting:  # the extension, counting its fused decoder calls
        def __getattr__(self, name):
            if name == "decoder_layers":
                calls.append(name)
            return getattr(built, name)

    monkeypatch.setattr(cpu_kernels, "kernels", Counting)
    fused = outputs(llm)
    fused_routing = llm.engine.observer.tokens.clone()
    steps = len(calls)
    assert steps > 2 * 12  # every step of both batches ran the layers in one call
    eager = LLM(model=str(directory), dtype="bfloat16", max_num_batched_tokens=32, max_num_seqs=4,
                enable_prefix_caching=False, kv_cache_memory=2**22, quantization=quantization, enforce_eager=True)
    assert eager.engine.runner.fused is None
    modules = outputs(eager)
    assert len(calls) == steps  # the modules ran
    assert fused == modules
    assert (eager.engine.observer.tokens == fused_routing).all()  # the routing statistics saw the same choices
    assert fused_routing.sum() == 2 * len(llm.engine.model.layers) * sum(
        len(p["prompt_token_ids"]) + 11 for p in PROMPTS) * 2  # tokens x layers x top-2, both batches


@pytest.mark.parametrize("arch, overrides, dtype", [
    ("mixtral", {}, "float32"),  # no tiles
    ("Qwen2Moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48), "bfloat16"),  # a shared expert
    ("Olmoe", dict(num_experts=4, num_experts_per_tok=2), "bfloat16"),  # QK-norm
])
def test_models_of_another_shape_run_their_modules(tmp_path, arch, overrides, dtype):
    llm = LLM(model=str(make_checkpoint(tmp_path, arch, seed=1, **overrides)), dtype=dtype, kv_cache_memory=2**22)
    assert llm.engine.runner.fused is None
    out = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3

"""The fused decoder (engine/fused_decoder.py): every decoder layer of a step in one kernel call, for models of
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
NEW = 8
QWEN2_MOE = ("Qwen2Moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                              shared_expert_intermediate_size=48))  # q/k/v biases, a gated shared expert
QWEN3_MOE = ("Qwen3Moe", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                              head_dim=32, attention_bias=True))  # QK-norm per head, biases on q/k/v and o
OLMOE = ("Olmoe", dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32, clip_qkv=0.5))  # QK-norm, clipped


def outputs(llm: LLM) -> list[tuple]:
    """Greedy tokens with their top-5 logprobs, then sampled ones (seeded), of a batch whose prompts are computed in
    chunks beside other sequences' decodes."""
    greedy = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, logprobs=5)
    sampled = SamplingParams(max_tokens=NEW, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    return [(c.token_ids, c.logprobs) for params in (greedy, sampled)
            for out in llm.generate(PROMPTS, params) for c in out.outputs]


@pytest.mark.parametrize("shape, quantization", [
    (("mixtral", {}), None), (("mixtral", {"sliding_window": 8}), None), (("mixtral", {}), "int4"),
    (("mixtral", {}), "int8"), (("mixtral", {}), "fp8"), (QWEN2_MOE, None), (QWEN2_MOE, "int8"), (QWEN3_MOE, None),
    (OLMOE, None)])
def test_the_fused_layers_give_what_the_modules_give_bit_for_bit(tmp_path, monkeypatch, shape, quantization):
    """bf16 and quantized at load (every linear layer and the experts), each family's options on."""
    arch, overrides = shape
    directory = make_checkpoint(tmp_path, arch, seed=3, **overrides)
    settings = dict(model=str(directory), dtype="bfloat16", max_num_batched_tokens=32, max_num_seqs=4,
                    enable_prefix_caching=False, kv_cache_memory=2**22, quantization=quantization)
    llm = LLM(**settings)
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
    assert steps > 2 * NEW  # every step of both batches ran the layers in one call
    eager = LLM(**settings, enforce_eager=True)
    assert eager.engine.runner.fused is None
    modules = outputs(eager)
    assert len(calls) == steps  # the modules ran
    assert fused == modules
    assert (eager.engine.observer.tokens == fused_routing).all()  # the routing statistics saw the same choices
    assert fused_routing.sum() == 2 * len(llm.engine.model.layers) * sum(
        len(p["prompt_token_ids"]) + NEW - 1 for p in PROMPTS) * 2  # tokens x layers x top-2, both batches


@pytest.mark.parametrize("arch, overrides, dtype", [
    ("mixtral", {}, "float32"),  # no tiles
    ("Qwen2Moe", {**QWEN2_MOE[1], "mlp_only_layers": [1]}, "bfloat16"),  # a dense layer among the MoE ones
    ("Qwen3Moe", {**QWEN3_MOE[1], "head_dim": 24}, "bfloat16"),  # a head dim the attention kernel does not take
    ("DeepseekV3", dict(num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, q_lora_rank=None,
                        n_group=1, topk_group=1, first_k_dense_replace=0), "bfloat16"),  # MLA, another router
])
def test_models_of_another_shape_run_their_modules(tmp_path, arch, overrides, dtype):
    llm = LLM(model=str(make_checkpoint(tmp_path, arch, seed=1, **overrides)), dtype=dtype, kv_cache_memory=2**22)
    assert llm.engine.runner.fused is None
    out = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3

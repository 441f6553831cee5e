"""gpt-oss against transformers' GptOssForCausalLM on the same random weights, and each of its features shown to
matter: attention sinks, the sliding window of alternate layers, YaRN rope, the experts' clamped SwiGLU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from checkpoints import make_checkpoint
from family_parity import (check_batched_prompt_logits, check_bfloat16_bar, check_greedy_with_shared_prefix,
                           check_requests_joining_mid_batch, engine, prompts_of, record_logits)
from localmoe import LLM, SamplingParams
from localmoe.experts.cpu import OneDNNExperts
from localmoe.layers.moe import SparseMoE

# Three layers: sliding, full, sliding (transformers' default layer_types), a window shorter than the prompts;
# YaRN stretching a 32-token original context 4 times; a clamp limit the expert activations reach at this weight
# scale (pre-activations have a std of about 1.2), and a non-default alpha, so both must come from config.json.
GPT_OSS = dict(num_local_experts=8, num_experts_per_tok=3, head_dim=24, sliding_window=6,
               max_position_embeddings=128, swiglu_limit=2.0, swiglu_alpha=1.5,
               rope_parameters=dict(rope_type="yarn", factor=4.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                                    original_max_position_embeddings=32, rope_theta=150000.0))
SEED = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("gpt-oss"), "GptOss", seed=SEED, **GPT_OSS)


def test_batched_prompt_logits_match(checkpoint):
    llm = check_batched_prompt_logits(checkpoint)
    layers = llm.engine.model.layers
    assert all(layer.self_attn.sinks is not None and layer.self_attn.sinks.abs().min() > 0 for layer in layers)
    assert [layer.self_attn.sliding_window for layer in layers] == [6, None, 6]


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_greedy_32_tokens_match_with_shared_prefix(checkpoint, prefix_caching):
    check_greedy_with_shared_prefix(checkpoint, prefix_caching)


def test_requests_joining_mid_batch_match(checkpoint):
    check_requests_joining_mid_batch(checkpoint)


def last_logits(llm: LLM, prompt: list[int]) -> torch.Tensor:
    steps = record_logits(llm)
    llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, temperature=0))
    return steps[0][0]


@pytest.mark.parametrize("feature,overrides", [
    ("sinks", {}),
    ("window", {"layer_types": ["full_attention"] * 3}),
    ("yarn", {"rope_parameters": {"rope_type": "default", "rope_theta": 150000.0}}),
    ("clamp", {"swiglu_limit": 7.0}),
])
def test_feature_off_changes_logits(checkpoint, tmp_path, feature, overrides):
    """The parity tests above mean something: the same weights with one feature switched off give other logits
    (the sinks removed from our model; the others through config.json)."""
    prompt = prompts_of([22])[0]
    other = engine(make_checkpoint(tmp_path, "GptOss", seed=SEED, **{**GPT_OSS, **overrides}) if overrides
                   else checkpoint)
    if feature == "sinks":
        for layer in other.engine.model.layers:
            layer.self_attn.sinks = None
    assert (last_logits(engine(checkpoint), prompt) - last_logits(other, prompt)).abs().max() > 1e-2


def test_mxfp4_checkpoint_is_refused_with_advice(checkpoint, tmp_path):
    """The hub's gpt-oss checkpoints keep their experts in MXFP4 (config.json says so); we serve dequantized ones."""
    quantized = shutil.copytree(checkpoint, tmp_path / "mxfp4")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quantized \(mxfp4.*Dequantize it first"):
        engine(quantized)


def test_bfloat16_smoke(checkpoint):
    """bf16 runs the experts' PyTorch path (the CPU kernel has no biases or clamped SwiGLU), and its logits are
    no further from transformers' float32 ones than twice transformers' own bf16 run is."""
    llm = check_bfloat16_bar(checkpoint, [5, 13, 22], new=4)
    moes = [m for m in llm.engine.model.modules() if isinstance(m, SparseMoE)]
    assert moes and all(isinstance(m.experts, OneDNNExperts) for m in moes)  # not the kernel's tiles

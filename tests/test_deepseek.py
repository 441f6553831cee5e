"""DeepSeek-V2 and V3 (multi-head latent attention, DeepSeekMoE) against transformers on the same random weights."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from safetensors.torch import load_file, save_file

from checkpoints import make_checkpoint
from family_parity import (check_batched_prompt_logits, check_bfloat16_bar, check_feature_matters,
                           check_greedy_with_shared_prefix,
                           check_requests_joining_mid_batch, moe_layers, no_renormalization)
from localmoe.experts.cpu import TiledExperts
from localmoe.layers.attention import AttentionMetadata
from localmoe.layers.cpu_kernels import kernels
from localmoe.layers.mla import MultiHeadLatentAttention, softmax_scale
from localmoe.layers.rotary import rotary_embedding
from localmoe.models.args import ModelArgs
from localmoe.models.deepseek import DeepseekV3ForCausalLM, DeepseekV3MoE
from localmoe.models.loader import load_model

# MLA widths all distinct, so a swapped one fails on shape: latent 16, rope 8, nope 16, value 12
SMALL = dict(num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
             kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, first_k_dense_replace=1)
V2_YARN = {"rope_type": "yarn", "factor": 16.0, "mscale": 0.707, "mscale_all_dim": 0.707,
           "original_max_position_embeddings": 256, "rope_theta": 10000.0, "beta_fast": 16}
V3_YARN = {"rope_type": "yarn", "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
           "original_max_position_embeddings": 128, "rope_theta": 10000.0}

SHAPES = {
    "v2-direct-q-greedy": ("DeepseekV2", dict(q_lora_rank=None, topk_method="greedy", routed_scaling_factor=1.5,
                                              attention_bias=True, n_shared_experts=1)),
    "v2-lora-q-grouped-yarn": ("DeepseekV2", dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4,
                                                  topk_group=2, n_shared_experts=2, first_k_dense_replace=2,
                                                  num_experts_per_tok=3, rope_parameters=V2_YARN)),
    "v3-direct-q-half-split-rope": ("DeepseekV3", dict(q_lora_rank=None, n_group=1, topk_group=1,
                                                       rope_interleave=False, norm_topk_prob=False)),
    "v3-lora-q-grouped-yarn": ("DeepseekV3", dict(q_lora_rank=24, n_group=4, topk_group=2, n_shared_experts=1,
                                                  rope_parameters=V3_YARN)),
}


def randomize_correction_bias(directory: Path, seed: int) -> None:
    """make_checkpoint leaves buffers alone; V3's correction bias would stay zero and prove nothing."""
    path = directory / "model.safetensors"
    tensors = load_file(path)
    g = torch.Generator().manual_seed(seed)
    for name, tensor in tensors.items():
        if name.endswith("e_score_correction_bias"):
            tensors[name] = 0.5 * torch.randn(tensor.shape, generator=g)
    save_file(tensors, path, metadata={"format": "pt"})


def checkpoint(directory: Path, shape: str, seed: int = 3) -> Path:
    arch, overrides = SHAPES[shape]
    make_checkpoint(directory, arch, seed=seed, **{**SMALL, **overrides})
    randomize_correction_bias(directory, seed)
    return directory


@pytest.mark.parametrize("shape", SHAPES)
def test_batched_prompt_logits_match(tmp_path, shape):
    llm = check_batched_prompt_logits(checkpoint(tmp_path, shape))
    cfg, caches = llm.engine.hf_config, llm.engine.runner.kv_caches
    # the cache holds the compressed latent and the rotary key per token, nothing per head
    assert all(c.shape[0] == 1 and c.shape[-1] == cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] for c in caches)
    moe = moe_layers(llm.engine.model)
    assert len(moe) == cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]
    assert all(m.shared_expert is not None for m in moe)


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_greedy_32_tokens_match_with_shared_prefix(tmp_path, prefix_caching):
    check_greedy_with_shared_prefix(checkpoint(tmp_path, "v3-lora-q-grouped-yarn", seed=5), prefix_caching)


def test_requests_joining_mid_batch_match(tmp_path):
    check_requests_joining_mid_batch(checkpoint(tmp_path, "v2-lora-q-grouped-yarn", seed=9))


def mla_layers(model: nn.Module) -> list[MultiHeadLatentAttention]:
    return [layer.self_attn for layer in model.layers]


# Switches for check_feature_matters: each turns one option of our loaded model off in place.
def no_group_limit(model: nn.Module) -> None:
    for moe in moe_layers(model):
        moe.topk_group = moe.num_groups


def no_routed_scaling(model: nn.Module) -> None:
    for moe in moe_layers(model):
        moe.scaling = 1.0


def no_correction_bias(model: nn.Module) -> None:
    for moe in moe_layers(model):
        assert moe.e_score_correction_bias.abs().min() > 0  # the random bias did load
        moe.e_score_correction_bias.data.zero_()


def no_yarn(model: nn.Module) -> None:
    plain = {"rope_type": "default", "rope_theta": 10000.0}
    for attention in mla_layers(model):
        attention.rotary = rotary_embedding(attention.rope_dim, model.config.max_position_embeddings, plain,
                                            attention.rotary.interleaved)
        attention.scale = softmax_scale(plain, attention.nope_dim + attention.rope_dim)


def no_yarn_softmax_correction(model: nn.Module) -> None:
    for attention in mla_layers(model):
        attention.scale = (attention.nope_dim + attention.rope_dim) ** -0.5


def adjacent_pair_rope(model: nn.Module) -> None:
    for attention in mla_layers(model):
        attention.rotary = rotary_embedding(attention.rope_dim, model.config.max_position_embeddings,
                                            model.config.rope, interleaved=True)


SWITCHED_OFF = {
    "v2 group limit": ("v2-lora-q-grouped-yarn", no_group_limit),
    "v2 yarn": ("v2-lora-q-grouped-yarn", no_yarn),
    "v2 yarn softmax scale": ("v2-lora-q-grouped-yarn", no_yarn_softmax_correction),
    "v2 routed scaling": ("v2-direct-q-greedy", no_routed_scaling),
    "v3 group limit": ("v3-lora-q-grouped-yarn", no_group_limit),
    "v3 correction bias": ("v3-lora-q-grouped-yarn", no_correction_bias),
    "v3 yarn": ("v3-lora-q-grouped-yarn", no_yarn),
    "v3 yarn softmax scale": ("v3-lora-q-grouped-yarn", no_yarn_softmax_correction),
    "v3 renormalisation": ("v3-lora-q-grouped-yarn", no_renormalization),
    "v3 routed scaling": ("v3-lora-q-grouped-yarn", no_routed_scaling),
    "v3 half-split rope": ("v3-direct-q-half-split-rope", adjacent_pair_rope),
}


@pytest.mark.parametrize("feature", SWITCHED_OFF)
def test_feature_switched_off_changes_logits(tmp_path, feature):
    shape, switch_off = SWITCHED_OFF[feature]
    check_feature_matters(checkpoint(tmp_path, shape), switch_off)


def test_moe_layer_freq_skips_layers(tmp_path):
    """DeepSeek's own code makes layer i sparse only past the dense ones and when i % moe_layer_freq == 0
    (every released checkpoint has 1; transformers ignores the field)."""
    cfg = json.loads((checkpoint(tmp_path, "v3-direct-q-half-split-rope") / "config.json").read_text())
    model = DeepseekV3ForCausalLM(ModelArgs.from_hf({**cfg, "num_hidden_layers": 5, "moe_layer_freq": 2}))
    assert [isinstance(layer.mlp, DeepseekV3MoE) for layer in model.layers] == [False, False, True, False, True]


def test_layers_past_num_hidden_layers_are_not_served(tmp_path):
    """V3 checkpoints carry their multi-token-prediction module as one more layer: it is skipped at load."""
    directory = checkpoint(tmp_path, "v3-direct-q-half-split-rope")
    cfg = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2}))
    check_batched_prompt_logits(directory, lengths=[5, 9])


def test_absorbed_decode_equals_expanded_attention(tmp_path):
    """Decode steps attend in latent space (weight absorption); the same step through the prefill path, which
    expands every cached latent into per-head keys and values, gives the same output."""
    model, cfg = load_model(checkpoint(tmp_path, "v2-lora-q-grouped-yarn"), "float32")
    attention = model.layers[0].self_attn
    cache = torch.zeros(attention.kv_cache_shape(8, 4))
    tables = [[0, 1, 2], [3, 4, 5, 6]]
    g = torch.Generator().manual_seed(0)

    def step(query_lens: list[int], context_lens: list[int]) -> tuple[torch.Tensor, AttentionMetadata, torch.Tensor]:
        meta = AttentionMetadata.build(query_lens, context_lens, tables, 4, torch.device("cpu"))
        positions = torch.cat([torch.arange(c - q, c) for q, c in zip(query_lens, context_lens)])
        return positions, meta, torch.randn(sum(query_lens), cfg["hidden_size"], generator=g)

    with torch.no_grad():
        positions, meta, x = step([5, 13], [5, 13])
        attention(positions, x, cache, meta)  # the prompts' latents into the cache
        positions, meta, x = step([1, 1], [6, 14])
        assert meta.decode_only
        absorbed = attention(positions, x, cache.clone(), meta)
        expanded = attention(positions, x, cache.clone(), dataclasses.replace(meta, decode_only=False))
    torch.testing.assert_close(absorbed, expanded, rtol=1e-5, atol=1e-5)


def test_bfloat16_smoke(tmp_path):
    """bf16 through the engine, decode steps on the CPU MoE kernel where it builds: the routing weights, scaled by
    routed_scaling_factor, reach the kernel, and the logits meet the bf16 bar (family_parity.check_bfloat16_bar)."""
    directory = checkpoint(tmp_path, "v3-lora-q-grouped-yarn", seed=11)
    llm = check_bfloat16_bar(directory, [18, 5], new=8)
    if kernels() is not None:
        assert all(isinstance(m.experts, TiledExperts) for m in moe_layers(llm.engine.model))

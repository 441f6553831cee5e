"""OLMoE against transformers on the same random weights."""

from __future__ import annotations

import pytest

from checkpoints import make_checkpoint
from family_parity import (check_batched_prompt_logits, check_feature_matters, check_greedy_with_shared_prefix,
                           check_requests_joining_mid_batch, no_attention_bias, no_qk_norm, no_renormalization)

# The published layout (64 experts, top-8, weights not renormalised) at a tiny width; then renormalised top-k,
# q/k/v clamped to +-1 (clip_qkv) and biases on all of q/k/v/o, the shape for the longer checks (packing 64
# experts a layer for each engine would cost seconds).
OLMOE = {"num_experts": 64, "num_experts_per_tok": 8, "intermediate_size": 16}
OLMOE_CLIPPED = {"num_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 32, "norm_topk_prob": True,
                 "clip_qkv": 1.0, "attention_bias": True}


@pytest.mark.parametrize("overrides", [OLMOE, OLMOE_CLIPPED], ids=["published", "clipped"])
def test_batched_prompt_logits_match(tmp_path, overrides):
    check_batched_prompt_logits(make_checkpoint(tmp_path, "Olmoe", seed=3, **overrides))


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_greedy_32_tokens_match_with_shared_prefix(tmp_path, prefix_caching):
    check_greedy_with_shared_prefix(make_checkpoint(tmp_path, "Olmoe", seed=5, **OLMOE_CLIPPED), prefix_caching)


def test_requests_joining_mid_batch_match(tmp_path):
    check_requests_joining_mid_batch(make_checkpoint(tmp_path, "Olmoe", seed=9, **OLMOE_CLIPPED))


def no_clip(model):
    for layer in model.layers:
        layer.self_attn.clip_qkv = None


@pytest.mark.parametrize("overrides,switch_off", [
    (OLMOE_CLIPPED, no_qk_norm),
    (OLMOE_CLIPPED, no_clip),
    (OLMOE_CLIPPED, no_renormalization),
    (OLMOE_CLIPPED, no_attention_bias),
], ids=["qk_norm", "clip_qkv", "norm_topk_prob", "attention_bias"])
def test_feature_matters(tmp_path, overrides, switch_off):
    """Each feature the parity tests above cover changes the logits when switched off on the same weights."""
    check_feature_matters(make_checkpoint(tmp_path, "Olmoe", seed=3, **overrides), switch_off)

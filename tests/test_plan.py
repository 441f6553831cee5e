"""The memory planner: parameter counts against published figures and against transformers' models,
KV bytes per token, the parallel degree and expert-cache answers, and the command's inputs and JSON."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers

from localmoe.planner import (PlanError, count_params, known_models, kv_elements_per_token, load_config,
                              model_shape, parse_device, plan_command, plan_memory)
from localmoe.planner.shape import KNOWN_MODELS_DIR

# name: (published total, published active, whether the publisher's active count leaves out the input embedding)
PUBLISHED = {
    "Mixtral-8x7B": (46.7e9, 12.9e9, False),
    "Mixtral-8x22B": (141e9, 39e9, False),
    "DeepSeek-V3": (671e9, 37e9, False),
    "DeepSeek-MoE-16B": (16.4e9, 2.8e9, False),
    "Qwen1.5-MoE-A2.7B": (14.3e9, 2.7e9, False),
    "Qwen2-57B-A14B": (57.4e9, 14e9, False),
    "DBRX": (132e9, 36e9, False),
    "OLMoE-1B-7B": (6.9e9, 1.3e9, False),
    "Qwen3-30B-A3B": (30.5e9, 3.3e9, False),
    # The gpt-oss model card counts the unembedding but not the embedding lookup: 5.13B active.
    "gpt-oss-120b": (116.8e9, 5.1e9, True),
}


def shape_of(name: str):
    return model_shape(*load_config(name))


def test_every_known_model_has_a_published_figure():
    assert set(known_models()) == set(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_totals_match_published_counts(name):
    total, active, without_embedding = PUBLISHED[name]
    params = count_params(shape_of(name))
    assert params.total == pytest.approx(total, rel=0.02)
    counted = params.active_without_embedding if without_embedding else params.active
    assert counted == pytest.approx(active, rel=0.10)


def test_kv_bytes_per_token():
    mixtral = plan_memory(shape_of("Mixtral-8x7B"), parse_device("H100-80GB"))
    assert mixtral.kv_attention == "standard"
    assert mixtral.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    deepseek = plan_memory(shape_of("DeepSeek-V3"), parse_device("H100-80GB"), dtype="bf16")
    assert deepseek.kv_attention == "mla"
    assert deepseek.kv_bytes_per_token == 61 * (512 + 64) * 2
    fp8 = plan_memory(shape_of("DeepSeek-V3"), parse_device("H100-80GB"), kv_cache_dtype="fp8")
    assert fp8.kv_bytes_per_token == 61 * (512 + 64 + 1)  # a byte a number, one a latent entry for its scale
    fp8 = plan_memory(shape_of("Mixtral-8x7B"), parse_device("H100-80GB"), kv_cache_dtype="fp8_e4m3")
    assert fp8.kv_bytes_per_token == 2 * 32 * 8 * (128 + 1)


def test_sliding_window_layers_are_counted_as_full_and_said_so():
    plan = plan_memory(shape_of("gpt-oss-120b"), parse_device("H100-80GB"))
    assert plan.kv_bytes_per_token == 2 * 36 * 8 * 64 * 2
    assert any("18 of 36 layers" in note and "upper bound" in note for note in plan.notes)


def test_weight_bytes_per_quantization():
    plan = plan_memory(shape_of("Mixtral-8x7B"), parse_device("H100-80GB"), quantization="int8")
    total, p = plan.params.total, plan.params
    assert plan.weight_bytes == plan.weight_bytes_per_quantization["int8"]
    assert plan.weight_bytes_per_quantization["none"] == 2 * total
    hidden, inter = 4096, 14336  # an expert: w13 [2I, D] and w2 [D, I], a byte a weight, 8 bytes of scales a row
    assert plan.expert_bytes == 2 * inter * (hidden + 8) + hidden * (inter + 8)
    dense = p.embedding + p.routers + p.norms
    other = total - dense - p.routed_experts  # attention and the head, in int8 too
    experts = p.num_moe_layers * 8 * plan.expert_bytes
    assert plan.weight_bytes == pytest.approx(other * (1 + 8 / hidden) + experts + 2 * dense, rel=1e-6)
    # published sizes, on disk: TheBloke's Mixtral-8x7B AWQ about 24.7 GB; DeepSeek-V3's FP8 release about 688 GB
    # with scales (of which ~14 GB is its multi-token-prediction module, which LocalMoE does not load and the planner
    # omits). In memory each quantized weight's scales are float32 with a float32 zero point, per row and group of
    # 128 columns: 8 bytes per 128 weights, where AWQ stores 2.5 (an fp16 scale and a 4-bit zero point) and
    # DeepSeek-V3 4 per 128 x 128 block.
    awq = plan.weight_bytes_per_quantization["awq"] - (p.attention + p.routed_experts) * (8 - 2.5) / 128
    assert awq / 1e9 == pytest.approx(24.7, rel=0.03)
    deepseek = plan_memory(shape_of("DeepSeek-V3"), parse_device("H100-80GB"), quantization="fp8")
    d = deepseek.params
    quantized = d.attention + d.dense_mlp + d.shared_experts + d.routed_experts
    on_disk = deepseek.weight_bytes - quantized * (8 / 128 - 4 / 128**2)
    assert on_disk / 1e9 == pytest.approx(688 - 14, rel=0.03)
    with pytest.raises(PlanError, match="quantization"):
        plan_memory(shape_of("Mixtral-8x7B"), parse_device("H100-80GB"), quantization="int3")
    with pytest.raises(PlanError, match="--quantization"):
        plan_memory(shape_of("Mixtral-8x7B"), parse_device("H100-80GB"), dtype="int8")


SMALL = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
MLA = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
           intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=2,
           num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=8,
           qk_rope_head_dim=4, v_head_dim=12)
TINY_CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
                                                  **SMALL),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4,
        num_experts_per_tok=2, **SMALL),
    "qwen2_moe-dense-layers": lambda: transformers.Qwen2MoeConfig(
        intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[3], **SMALL),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                                                     num_experts_per_tok=2, head_dim=24, **SMALL),
    "olmoe": lambda: transformers.OlmoeConfig(intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                              eos_token_id=None, pad_token_id=1, **SMALL),
    "gpt_oss": lambda: transformers.GptOssConfig(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                                 head_dim=16, **SMALL),
    "deepseek_v2": lambda: transformers.DeepseekV2Config(q_lora_rank=None, **MLA),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(q_lora_rank=24, n_group=2, topk_group=1, **MLA),
    "deepseek_v3-no-q-lora": lambda: transformers.DeepseekV3Config(q_lora_rank=None, n_group=2, topk_group=1, **MLA),
    "qwen2-dense-tied": lambda: transformers.Qwen2Config(intermediate_size=96, tie_word_embeddings=True, **SMALL),
    "llama-dense": lambda: transformers.LlamaConfig(intermediate_size=96, **SMALL),
    "dbrx": lambda: transformers.DbrxConfig(
        d_model=64, n_heads=4, n_layers=2, vocab_size=128, attn_config={"kv_n_heads": 2, "rope_theta": 10000.0},
        ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2}),
}


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_total_equals_transformers_parameter_count(family, tmp_path):
    config = TINY_CONFIGS[family]()
    config.save_pretrained(tmp_path)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    expected = sum(p.numel() for p in model.parameters())
    # DeepSeek-V3's e_score_correction_bias is a checkpoint tensor the planner counts; transformers
    # registers it as a buffer, not a parameter.
    expected += sum(b.numel() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias"))
    assert count_params(model_shape(*load_config(str(tmp_path)))).total == expected
    assert json.loads(plan_command(str(tmp_path), json_output=True))["params"]["total"] == expected


def test_mixtral_bf16_needs_two_h100s():
    plan = plan_memory(shape_of("Mixtral-8x7B"), parse_device("H100-80GB"), dtype="bf16")
    assert not plan.fits_on_one_device
    assert plan.parallel_degree == 2
    assert plan.parallel_kv_budget_bytes > 0
    assert 0 < plan.experts_per_layer_cached < 8


def test_mixtral_on_16_gib_of_cpu_needs_an_expert_cache():
    # The default 32768-token context alone takes 4 GiB of KV, leaving room for no full set of
    # 32 layers' copies of one expert; at 4096 tokens one expert per layer fits.
    plan = plan_memory(shape_of("Mixtral-8x7B"), parse_device("cpu:16"), max_model_len=4096)
    assert plan.cuda_context_bytes == 0
    assert not plan.fits_on_one_device
    assert 0 < plan.experts_per_layer_cached < 8
    default = plan_memory(shape_of("Mixtral-8x7B"), parse_device("cpu:16"))
    assert default.max_model_len == 32768 and default.max_model_len_is_default
    assert default.experts_per_layer_cached == 0


def test_small_model_fits_and_has_no_expert_cache():
    plan = plan_memory(shape_of("OLMoE-1B-7B"), parse_device("A100-40GB"), max_num_seqs=8)
    assert plan.fits_on_one_device and plan.parallel_degree == 1
    assert plan.experts_per_layer_cached is None
    assert plan.max_model_len == 4096  # min(max_position_embeddings, 32768)
    assert plan.max_concurrent_tokens == plan.kv_budget_bytes // plan.kv_bytes_per_token
    assert plan.requested_fits


def test_json_output_has_the_fields():
    data = json.loads(plan_command("mixtral-8x7b", device="H100-80GB", json_output=True))
    for key in ("model", "dtype", "device", "max_model_len", "max_model_len_is_default", "weight_bytes",
                "weight_bytes_per_quantization", "quantization", "kv_bytes_per_token", "kv_budget_bytes", "cuda_context_bytes",
                "margin_bytes", "max_concurrent_tokens", "requested_fits", "parallel_degree",
                "experts_per_layer_cached", "notes"):
        assert key in data
    assert data["params"]["total"] == count_params(shape_of("Mixtral-8x7B")).total
    assert data["params"]["active"] > 0 and data["parallel_degree"] == 2


def test_text_output_states_the_default_length():
    text = plan_command("Mixtral-8x7B")
    assert "32768 (default: min(max_position_embeddings, 32768))" in text
    assert "TP/EP degree" in text and "Expert cache" in text


def test_accepts_checkpoint_directory_and_config_path(tmp_path):
    shutil.copy(KNOWN_MODELS_DIR / "Qwen3-30B-A3B.json", tmp_path / "config.json")
    by_name = json.loads(plan_command("qwen3-30b-a3b", json_output=True))
    by_dir = json.loads(plan_command(str(tmp_path), json_output=True))
    by_path = json.loads(plan_command(str(tmp_path / "config.json"), json_output=True))
    assert by_name["params"] == by_dir["params"] == by_path["params"]
    assert by_name["kv_bytes_per_token"] == by_dir["kv_bytes_per_token"] == by_path["kv_bytes_per_token"]


def test_names_match_case_insensitively_and_by_hub_id():
    assert load_config("DEEPSEEK-v3")[0] == "DeepSeek-V3"
    assert load_config("mistralai/Mixtral-8x7B-v0.1")[0] == "Mixtral-8x7B"


@pytest.mark.parametrize("kwargs, message", [
    ({"model": "no-such-model"}, "Mixtral-8x7B"),
    ({"model": "Mixtral-8x7B", "device": "TPU"}, "H100-80GB"),
    ({"model": "Mixtral-8x7B", "device": "cpu:lots"}, "cpu:64"),
    ({"model": "Mixtral-8x7B", "dtype": "int4"}, "bf16"),
    ({"model": "Mixtral-8x7B", "kv_cache_dtype": "int8"}, "fp8"),
])
def test_bad_input_is_a_plan_error_that_says_what_works(kwargs, message):
    with pytest.raises(PlanError, match=message):
        plan_command(**kwargs)


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(PlanError, match="BertModel"):
        plan_command(str(tmp_path))


def test_mla_kv_is_latent_plus_rope_key():
    shape = shape_of("DeepSeek-V3")
    assert kv_elements_per_token(shape) == 61 * (shape.attention.kv_lora_rank + shape.attention.qk_rope_head_dim)


def test_plans_localmoe_own_architecture_as_the_model_it_serves(tmp_path, monkeypatch):
    """`localmoe-random` with expert-choice routing is LocalMoEForCausalLM: planned like Mixtral, its total is the
    parameter count of the model LocalMoE loads from it."""
    from localmoe.config import ModelConfig
    from localmoe.models.builtin import ensure_random_checkpoint
    from localmoe.models.loader import load_model

    monkeypatch.setenv("LOCALMOE_CACHE", str(tmp_path))
    directory = ensure_random_checkpoint(ModelConfig(hidden_size=64, intermediate_size=96, num_layers=2,
                                                     num_attention_heads=4, num_key_value_heads=2,
                                                     routing="expert_choice"))
    assert json.loads((directory / "config.json").read_text())["architectures"] == ["LocalMoEForCausalLM"]
    model, _ = load_model(directory, dtype="float32")
    plan = json.loads(plan_command(str(directory), json_output=True))
    assert plan["params"]["total"] == sum(p.numel() for p in model.parameters())

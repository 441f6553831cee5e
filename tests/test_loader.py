"""Checkpoint loading: layouts we accept and the clear errors for those we do not."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import make_checkpoint, reference_model
from localmoe.models.loader import load_model


def test_sharded_checkpoint_loads(tmp_path):
    directory = make_checkpoint(tmp_path, "mixtral", seed=1, max_shard_size="200KB")
    assert (directory / "model.safetensors.index.json").exists()
    assert len(list(directory.glob("*.safetensors"))) > 1
    model, _ = load_model(directory, "float32")
    ref = reference_model(directory)
    assert torch.equal(model.layers[1].mlp.experts.w2[3], ref.model.layers[1].mlp.experts.down_proj[3])


def test_fused_expert_tensors_load(tmp_path):
    """transformers' in-memory names (experts.gate_up_proj / down_proj) load like per-expert ones."""
    per_expert = make_checkpoint(tmp_path / "a", "mixtral", seed=2)
    ref = reference_model(per_expert)
    fused = tmp_path / "b"
    fused.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (fused / name).write_bytes((per_expert / name).read_bytes())
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(fused / "model.safetensors"))
    a, _ = load_model(per_expert, "float32")
    b, _ = load_model(fused, "float32")
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), name


def test_dtype_cast(tiny_mixtral_dir):
    model, _ = load_model(tiny_mixtral_dir, "bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_unsupported_architecture_names_supported_list(tmp_path):
    directory = make_checkpoint(tmp_path, "mixtral", seed=0)
    config = json.loads((directory / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="FalconForCausalLM.*not supported.*MixtralForCausalLM"):
        load_model(directory)


def test_broken_checkpoints_fail_with_the_problem_named(tmp_path):
    directory = make_checkpoint(tmp_path, "mixtral", seed=0)
    with pytest.raises(ValueError, match="config.json is missing"):
        load_model(tmp_path / "nowhere")
    weights = directory / "model.safetensors"
    from safetensors.torch import load_file
    state = load_file(str(weights))
    del state["model.layers.0.block_sparse_moe.experts.1.w2.weight"]
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"missing weight layers\.0\.mlp\.experts\.w2"):
        load_model(directory)
    state["model.layers.0.block_sparse_moe.experts.1.w2.weight"] = torch.zeros(3, 3)
    save_file(state, str(weights))
    with pytest.raises(ValueError, match="has shape"):
        load_model(directory)
    state["model.layers.0.block_sparse_moe.experts.1.w2.weight"] = torch.zeros(64, 96)
    state["model.layers.0.mystery.weight"] = torch.zeros(2)
    save_file(state, str(weights))
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.mystery.weight'"):
        load_model(directory)


def test_a_missing_piece_of_a_merged_weight_is_named(tmp_path):
    """q/k/v merge into qkv_proj and w1/w3 into w13: each piece must still be present."""
    directory = make_checkpoint(tmp_path, "mixtral", seed=0)
    weights = directory / "model.safetensors"
    from safetensors.torch import load_file
    state = load_file(str(weights))
    k_proj = state.pop("model.layers.1.self_attn.k_proj.weight")
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"missing weight layers\.1\.self_attn\.qkv_proj\.weight"):
        load_model(directory)
    state["model.layers.1.self_attn.k_proj.weight"] = k_proj
    del state["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"missing weight layers\.0\.mlp\.experts\.w13"):
        load_model(directory)

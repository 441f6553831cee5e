"""ModelArgs: config.json's dict read into the typed settings the model files use."""

from __future__ import annotations

import json
import re

import pytest

from checkpoints import make_checkpoint
from localmoe.models.args import ModelArgs
from localmoe.models.loader import load_model
from localmoe.models.qwen_moe import Qwen2MoeForCausalLM

BASE = {"vocab_size": 32, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 128}


def test_defaults_are_the_ones_the_families_assume():
    args = ModelArgs.from_hf({**BASE, "rms_norm_eps": None, "some_unknown_key": 1})
    assert (args.num_key_value_heads, args.head_dim) == (4, 16)
    assert args.rms_norm_eps == 1e-6 and not args.tie_word_embeddings and not args.attention_bias
    assert args.rope == {"rope_type": "default", "rope_theta": 10000.0}
    assert args.mlp_only_layers == [] and args.decoder_sparse_step == 1 and args.moe_layer_freq == 1


def test_rope_settings_are_read_from_either_place():
    assert ModelArgs.from_hf({**BASE, "rope_theta": 1e6}).rope["rope_theta"] == 1e6
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    assert ModelArgs.from_hf({**BASE, "rope_scaling": yarn}).rope["rope_type"] == "yarn"


def test_qwen_num_experts_falls_back_to_num_local_experts():
    assert ModelArgs.from_hf({**BASE, "num_local_experts": 8}).num_experts == 8
    assert ModelArgs.from_hf({**BASE, "num_local_experts": 8, "num_experts": 6}).num_experts == 6


def test_a_missing_field_is_named():
    with pytest.raises(ValueError, match="config.json lacks the field 'hidden_size'"):
        ModelArgs.from_hf({k: v for k, v in BASE.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="lacks the field 'moe_intermediate_size'"):
        ModelArgs.from_hf({**BASE, "num_experts": 4, "num_experts_per_tok": 2}, Qwen2MoeForCausalLM.required_fields)


def test_the_loader_names_a_missing_field_and_its_file(tmp_path):
    directory = make_checkpoint(tmp_path, "mixtral", seed=0)
    config = json.loads((directory / "config.json").read_text())
    del config["num_local_experts"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(f"{directory}/config.json lacks the field 'num_local_experts'")):
        load_model(directory)

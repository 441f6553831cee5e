"""A quantization at load with tensor and expert parallelism (distributed/sharded_quantization.py), on a tiny random
Mixtral in float32: TP=2 and EP=2 with --quantization int8 give one int8 process's logits within 1e-4 and its 32
greedy tokens, each rank holding about half the experts' bytes and, for a row-parallel layer, one process's own
scales; int4 experts, whole under EP, likewise; int4 groups that a TP split would cut are refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pytest import approx

from checkpoints import make_checkpoint
from family_parity import TOL, engine
from localmoe.config import ConfigError
from localmoe.layers.quant_linear import QuantLinear
from test_tensor_parallel import SETTINGS, assert_runs_as_one_process, run_prompts

INT4_EXPERTS = {"quantization": "int4", "quantize_experts_only": True}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("mixtral"), "mixtral", seed=5, tie_word_embeddings=True)


@pytest.mark.parametrize("layout", [{}, {"enable_expert_parallel": True}], ids=["tp2", "ep2"])
def test_int8_over_two_ranks_equals_one_int8_process(checkpoint, layout):
    single = engine(checkpoint, quantization="int8", **SETTINGS)
    expected_steps, expected_tokens = run_prompts(single)
    dense = engine(checkpoint, **SETTINGS)
    dense_steps, _ = run_prompts(dense)
    assert (dense_steps[0] - expected_steps[0]).abs().max().item() > TOL  # int8 changes the logits
    parallel = engine(checkpoint, tensor_parallel_size=2, quantization="int8", **layout, **SETTINGS)
    try:
        assert_runs_as_one_process(parallel, expected_steps, expected_tokens)
        runner = parallel.engine.runner
        assert runner.on_every_rank("expert_bytes") == approx([single.engine.runner.expert_bytes() / 2] * 2, rel=0.05)
        # o_proj is split by columns: rank 0's half of every row has the scale of the whole row, one process's
        ours, theirs = (llm.engine.model.layers[0].self_attn.o_proj for llm in (parallel, single))
        assert isinstance(ours, QuantLinear) and ours.in_features * 2 == theirs.in_features
        assert torch.equal(ours.scales, theirs.scales)
    finally:
        parallel.engine.runner.shutdown()


def test_int4_experts_spread_whole_equal_one_process(checkpoint):
    single = engine(checkpoint, **INT4_EXPERTS, **SETTINGS)
    expected_steps, expected_tokens = run_prompts(single)
    ep = engine(checkpoint, tensor_parallel_size=2, enable_expert_parallel=True, **INT4_EXPERTS, **SETTINGS)
    try:
        assert_runs_as_one_process(ep, expected_steps, expected_tokens)
        assert ep.engine.runner.on_every_rank("expert_bytes") == approx(
            [single.engine.runner.expert_bytes() / 2] * 2, rel=0.05)
    finally:
        ep.engine.runner.shutdown()


def test_int4_groups_a_split_would_cut_are_refused(checkpoint):
    """The tiny experts' rows of 96 columns are one int4 group; two ranks would take 48 columns of it each."""
    with pytest.raises(ConfigError, match="quantization 'int4': tensor_parallel_size 2 splits .* which cuts its "
                                          "groups of 96 columns"):
        engine(checkpoint, tensor_parallel_size=2, **INT4_EXPERTS, **SETTINGS)

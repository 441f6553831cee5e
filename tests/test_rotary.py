"""Rotary tables against transformers' own rope initialisation, and the adjacent-pair layout."""

from __future__ import annotations

import pytest
import torch

from localmoe.layers.rotary import RotaryEmbedding, inverse_frequencies, rope_parameters


@pytest.mark.parametrize("arch,rope", [
    ("GptOss", {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 64, "rope_theta": 150000.0}),
    ("DeepseekV3", {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                    "original_max_position_embeddings": 128, "rope_theta": 10000.0}),
    ("DeepseekV2", {"rope_type": "yarn", "factor": 4.0, "mscale": 0.707, "mscale_all_dim": 0.707,
                    "original_max_position_embeddings": 256, "rope_theta": 10000.0, "beta_fast": 16}),
])
def test_yarn_frequencies_match_transformers(arch, rope):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = getattr(transformers, f"{arch}Config")(rope_parameters=rope, max_position_embeddings=1024)
    dim = getattr(config, "qk_rope_head_dim", None) or config.head_dim
    expected, factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    ours, our_factor = inverse_frequencies(dim, rope_parameters(config.to_dict()), 1024)
    torch.testing.assert_close(ours, expected.float())
    assert our_factor == pytest.approx(factor)
    plain = inverse_frequencies(dim, {"rope_type": "default", "rope_theta": rope["rope_theta"]}, 1024)[0]
    assert not torch.allclose(ours, plain)  # the scaling changes the tables


def test_adjacent_pairs_rotate_like_complex_numbers():
    """DeepSeek's layout: pair (x[2i], x[2i+1]) is the complex number x[2i] + i x[2i+1] times e^(i pos f_i); our
    output is in half-split order, the same permutation for queries and keys."""
    dim, params = 8, {"rope_type": "default", "rope_theta": 10000.0}
    rotary = RotaryEmbedding(dim, 32, params, interleaved=True)
    x = torch.randn(5, 3, dim)
    positions = torch.tensor([0, 3, 7, 11, 31])
    inv_freq, _ = inverse_frequencies(dim, params, 32)
    turn = torch.polar(torch.ones(5, dim // 2), positions[:, None].float() * inv_freq)[:, None]
    rotated = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * turn)  # [5, 3, D/2, 2]
    torch.testing.assert_close(rotary(positions, x), rotated.transpose(-1, -2).flatten(-2))

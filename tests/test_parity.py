"""LocalMoE's logits and greedy tokens against transformers' own implementation, same weights."""

from __future__ import annotations

import sys
import subprocess

import pytest
import torch

from checkpoints import make_checkpoint
from family_parity import (TEST_DEVICE, check_batched_prompt_logits, check_bfloat16_bar,
                           check_greedy_with_shared_prefix, check_requests_joining_mid_batch, engine, prompts_of,
                           record_logits)
from localmoe import SamplingParams
from localmoe.layers.linear import Linear, packing_supported
from localmoe.layers.cpu_kernels import kernels
from localmoe.experts.cpu import OneDNNExperts, TiledExperts
from localmoe.experts.gpu import TritonExperts
from localmoe.layers.moe import SparseMoE

@pytest.mark.parametrize("arch,overrides", [
    ("mixtral", {}),
    ("mixtral", {"num_local_experts": 8, "num_experts_per_tok": 3, "head_dim": 24}),
    ("mistral", {"sliding_window": 8}),
    ("llama", {"attention_bias": True, "tie_word_embeddings": True}),
])
def test_batched_prompt_logits_match(tmp_path, arch, overrides):
    llm = check_batched_prompt_logits(make_checkpoint(tmp_path, arch, seed=3, **overrides))
    if TEST_DEVICE == "cuda":  # the Triton kernels are what ran
        assert all(isinstance(m.experts, TritonExperts) for m in llm.engine.model.modules() if isinstance(m, SparseMoE))
    elif packing_supported(torch.float32, torch.device("cpu")):  # the packed CPU weight layout is what ran
        modules = list(llm.engine.model.modules())
        assert all(m.weight.is_mkldnn for m in modules if isinstance(m, Linear))
        assert all(isinstance(m.experts, OneDNNExperts) for m in modules if isinstance(m, SparseMoE))


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_greedy_32_tokens_match_with_shared_prefix(tmp_path, prefix_caching):
    check_greedy_with_shared_prefix(make_checkpoint(tmp_path, "mixtral", seed=5), prefix_caching)


def test_requests_joining_mid_batch_match(tmp_path):
    check_requests_joining_mid_batch(make_checkpoint(tmp_path, "mixtral", seed=9))


def test_sliding_window_shorter_than_prompt_matters(tmp_path):
    """The window test above means something: the same weights without a window give other logits."""
    windowed = make_checkpoint(tmp_path / "w", "mistral", seed=3, sliding_window=8)
    full = make_checkpoint(tmp_path / "f", "mistral", seed=3, sliding_window=None)
    prompt = {"prompt_token_ids": prompts_of([22])[0]}
    logits = []
    for directory in (windowed, full):
        llm = engine(directory)
        steps = record_logits(llm)
        llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0))
        logits.append(steps[0][0])
    assert (logits[0] - logits[1]).abs().max() > 1e-2


def test_engine_never_imports_transformers_modeling(tiny_mixtral_dir):
    """Tokenizers come from transformers; no model class (PreTrainedModel, modeling_mixtral) may."""
    code = (
        "import sys\n"
        "from localmoe import LLM, SamplingParams\n"
        f"llm = LLM(model={str(tiny_mixtral_dir)!r}, dtype='float32', kv_cache_memory=2**22)\n"
        "llm.generate('hello', SamplingParams(max_tokens=4))\n"
        "import re\n"
        "model_code = re.compile(r'transformers\\.(modeling_utils|models\\.(?!auto\\.)\\w+\\.modeling_\\w+)$')\n"
        "bad = [m for m in sys.modules if model_code.match(m)]\n"
        "assert not bad, bad\n"
        "print('clean')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "clean" in result.stdout


BF16_SEED = 11


def test_bfloat16_logits_no_further_from_float32_than_transformers_bfloat16(tmp_path):
    """The bf16 bar (family_parity.check_bfloat16_bar) on eight batched requests, 32 tokens each; decode steps
    run our CPU MoE kernel where it builds."""
    directory = make_checkpoint(tmp_path, "mixtral", seed=11, hidden_size=128, intermediate_size=256)
    llm = check_bfloat16_bar(directory, [7, 30, 18, 2, 11, 25, 4, 16], new=32)
    if TEST_DEVICE == "cuda":
        assert all(isinstance(m.experts, TritonExperts) for m in llm.engine.model.modules() if isinstance(m, SparseMoE))
    elif kernels() is not None:
        assert all(isinstance(m.experts, TiledExperts) for m in llm.engine.model.modules() if isinstance(m, SparseMoE))

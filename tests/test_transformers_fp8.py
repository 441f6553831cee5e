"""transformers 5's fine-grained fp8 MoE checkpoints (FineGrainedFP8Config): its quantizer, run on a tiny random Mixtral
and Qwen2-MoE, keeps each MoE layer's experts as fused 3-D fp8 parameters with block scales beside them
(`experts.gate_up_proj` [E, 2I, H], `gate_up_proj_scale_inv` [E, 2I / 32, H / 32], `down_proj`, `down_proj_scale_inv`).
Two checkpoints of them: as its save_pretrained writes it (the weights one per expert under the checkpoint's names,
the scales still fused per layer) and as the model holds them (the fused tensors themselves, what a family without a
name conversion saves). transformers cannot serve either on CPU (it drops the fused scales as unexpected), so the
reference is transformers on the dense weights its own Fp8Dequantize makes of them."""

from __future__ import annotations

import shutil
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import make_checkpoint
from family_parity import (check_batched_prompt_logits, check_greedy_with_shared_prefix, check_offloaded_like_resident,
                           check_quantized_kernels)
from localmoe.experts.quantized import QuantGroupedExperts
from localmoe.layers.cpu_kernels import cpu_has_avx512_bf16
from localmoe.layers.moe import moe_blocks
from localmoe.models.builtin import write_byte_tokenizer

BLOCK = 32  # weight_block_size [32, 32] on a model of hidden size 64
ARCHS = {"mixtral": {}, "Qwen2Moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 96,
                                     "shared_expert_intermediate_size": 64}}


def quantized_by_transformers(source: Path):
    """transformers' own FP8 quantization of the checkpoint, in memory. Its quantizer runs on CPU, but refuses to
    start without a GPU; this skips that check."""
    import transformers
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    cls = transformers.AutoModelForCausalLM
    with patch.object(FineGrainedFP8HfQuantizer, "validate_environment", lambda self, *args, **kwargs: None):
        return cls.from_pretrained(source, dtype=torch.float32,
                                   quantization_config=transformers.FineGrainedFP8Config(weight_block_size=[BLOCK] * 2))


def dequantized(model) -> dict[str, torch.Tensor]:
    """The model's state, each fp8 weight dequantized with its scales by transformers' Fp8Dequantize."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    state = model.state_dict()
    dense = {name: t for name, t in state.items() if not name.endswith("scale_inv")}
    for name, scale in state.items():
        weight = name.replace("weight_scale_inv", "weight") if name.endswith("weight_scale_inv") \
            else name.removesuffix("_scale_inv")
        if name.endswith("scale_inv") and state[weight].dtype == torch.float8_e4m3fn:
            dense[weight] = Fp8Dequantize(None)._dequantize_one(state[weight], scale, torch.float32)
    return dense


def fp8_checkpoints(root: Path, arch: str) -> dict[str, Path]:
    import transformers

    source = make_checkpoint(root / "source", arch=arch, seed=9, **ARCHS[arch])
    model = quantized_by_transformers(source)
    fused = [name for name, p in model.named_parameters() if name.endswith("experts.gate_up_proj")]
    assert fused and all(model.get_parameter(name).dtype == torch.float8_e4m3fn for name in fused)
    saved, fused_dir, dense = root / "saved", root / "fused", root / "dense"
    model.save_pretrained(saved)
    write_byte_tokenizer(saved)
    shutil.copytree(saved, fused_dir)
    save_file({name: t.contiguous() for name, t in model.state_dict().items()}, fused_dir / "model.safetensors",
              metadata={"format": "pt"})
    reference = transformers.AutoModelForCausalLM.from_config(model.config.__class__.from_pretrained(source))
    reference.load_state_dict(dequantized(model))
    reference.save_pretrained(dense)
    write_byte_tokenizer(dense)
    return {"saved": saved, "fused": fused_dir, "dense": dense}


@pytest.fixture(scope="module", params=list(ARCHS))
def checkpoints(request, tmp_path_factory) -> dict[str, Path]:
    return fp8_checkpoints(tmp_path_factory.mktemp(f"fp8-{request.param}"), request.param)


@pytest.mark.parametrize("layout", ["saved", "fused"])
def test_float32_logits_equal_transformers_on_its_dequantized_weights(checkpoints, layout):
    llm = check_batched_prompt_logits(checkpoints[layout], reference=checkpoints["dense"])
    model = llm.engine.model
    assert not model.quantized_checkpoint.dense
    for _, moe in moe_blocks(model):  # the checkpoint's fp8 bytes, a scale per row and block of 32 columns
        assert isinstance(moe.experts, QuantGroupedExperts) and moe.experts.float8
        assert moe.experts.w13_scales.shape[-1] == moe.experts.w13_packed.shape[-1] // BLOCK
    check_greedy_with_shared_prefix(checkpoints[layout], True, new=8, reference=checkpoints["dense"])


@pytest.mark.avx512_bf16
@pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="needs a CPU with AVX512-BF16")
@pytest.mark.parametrize("layout", ["saved", "fused"])
def test_bf16_serves_the_fp8_experts_on_the_kernel(checkpoints, layout):
    check_quantized_kernels(checkpoints[layout], checkpoints["dense"])


@pytest.mark.parametrize("layout,target,dtype", [("saved", "disk", "float32"), ("fused", "host", "float32"),
                                                 ("fused", "disk", "bfloat16")])
def test_offloaded_fp8_experts_give_the_resident_outputs(checkpoints, layout, target, dtype):
    """The store reads each expert's fp8 bytes and its scales (one expert's rows of the fused tensors)."""
    if dtype == "bfloat16" and not cpu_has_avx512_bf16():
        pytest.skip("needs a CPU with AVX512-BF16")
    check_offloaded_like_resident(checkpoints[layout], target, dtype)

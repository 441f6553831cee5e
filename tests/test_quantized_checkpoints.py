"""Quantized checkpoints served end to end: a tiny Mixtral whose linear layers are stored as AWQ or GPTQ pack known
integers (the layouts of tests/test_quant_formats.py, here vectorized), or as DeepSeek-V3's fp8 with block scales;
LocalMoE serves those integers (float8 bytes) packed and its logits equal transformers' on the dense weights they
stand for."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import make_checkpoint
from family_parity import (check_batched_prompt_logits, check_greedy_with_shared_prefix, check_offloaded_like_resident,
                           check_quantized_kernels, engine)
from localmoe.config import ConfigError
from localmoe.planner.command import plan_command
from localmoe.planner.shape import PlanError
from localmoe.experts.quantized import QuantGroupedExperts
from localmoe.layers.cpu_kernels import cpu_has_avx512_bf16
from localmoe.layers.moe import moe_blocks
from localmoe.layers.quant_linear import QuantLinear
from localmoe.quant.weight import quantize, quantize_fp8

GROUP = 32
FP8_BLOCK = 32  # weight_block_size [32, 32]: DeepSeek-V3's layout (it has 128) on a model of hidden size 64
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i of a word holds column 8c + AWQ_ORDER[i]


def pack(values: torch.Tensor, bits: int, order: list[int] | None = None) -> torch.Tensor:
    """int32 words [..., C * bits / 32] from integers [..., C]: column (32 / bits) c + order[i] in bits `bits` i."""
    per = 32 // bits
    order = order or list(range(per))
    columns = values.long().unflatten(-1, (-1, per))[..., order]
    words = (columns << (torch.arange(per) * bits)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def quantized_linear(weight: torch.Tensor, fmt: str, g_idx: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    """The format's tensors for one linear layer [N, K] holding known 4-bit integers (from rounding `weight`), and
    the dense weight they stand for (with the scales as stored: fp16). fp8: float8 values with a float32 scale per
    block of FP8_BLOCK x FP8_BLOCK (weight_scale_inv)."""
    if fmt == "fp8":
        blocks = weight.unflatten(0, (-1, FP8_BLOCK)).transpose(0, 1).flatten(1)  # [FP8_BLOCK, rows/B * K]
        q = quantize_fp8(blocks, FP8_BLOCK)  # a scale per row and block of columns, then the max over the block's rows
        scale = q.scales.unflatten(1, (weight.shape[0] // FP8_BLOCK, -1)).amax(0)
        per_row = scale.repeat_interleave(FP8_BLOCK, 0)
        values = (weight / per_row.repeat_interleave(FP8_BLOCK, 1)).to(torch.float8_e4m3fn)
        return {"weight": values, "weight_scale_inv": scale}, values.float() * per_row.repeat_interleave(FP8_BLOCK, 1)
    q = quantize(weight, 4, GROUP, symmetric=False)
    values, zeros = q.values().long(), q.zeros.long()
    scales = q.scales.half()
    group = torch.arange(weight.shape[1]) // GROUP if g_idx is None else g_idx
    dense = scales.float()[:, group] * (values - zeros[:, group]).float()
    if fmt == "awq":
        return {"qweight": pack(values.T, 4, AWQ_ORDER), "qzeros": pack(zeros.T, 4, AWQ_ORDER),
                "scales": scales.T.contiguous()}, dense
    v1_zeros = pack(zeros.T, 4).long() - 0x11111111  # GPTQ v1 stores each word less 0x11111111
    tensors = {"qweight": pack(values, 4).T.contiguous(),
               "qzeros": torch.where(v1_zeros < -2**31, v1_zeros + 2**32, v1_zeros).to(torch.int32),
               "scales": scales.T.contiguous(), "g_idx": group.to(torch.int32)}
    return tensors, dense


def quantized_checkpoint(source: Path, root: Path, fmt: str, desc_act: bool = False) -> tuple[Path, Path]:
    """(the checkpoint as `fmt` stores it, a float32 dense checkpoint of the weights it stands for)."""
    name = f"{fmt}-desc" if desc_act else fmt
    packed_dir, dense_dir = root / name, root / f"{name}-dense"
    for d in (packed_dir, dense_dir):
        shutil.copytree(source, d)
    tensors = load_file(source / "model.safetensors")
    packed, dense = {}, {}
    g = torch.Generator().manual_seed(5)
    for key, tensor in tensors.items():
        prefix = key.removesuffix(".weight")
        if tensor.dim() == 2 and not any(p in key for p in ("embed_tokens", "lm_head", ".gate.")):
            columns = tensor.shape[1]
            g_idx = torch.randperm(columns, generator=g) // GROUP if desc_act else None
            parts, dense[key] = quantized_linear(tensor.float(), fmt, g_idx)
            packed |= {f"{prefix}.{suffix}": value for suffix, value in parts.items()}
        else:
            packed[key] = dense[key] = tensor.float()
    save_file(packed, packed_dir / "model.safetensors", metadata={"format": "pt"})
    save_file(dense, dense_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {
        "awq": {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm", "zero_point": True},
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": desc_act, "sym": False,
                 "checkpoint_format": "gptq"},
        "fp8": {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}}[fmt]
    (packed_dir / "config.json").write_text(json.dumps(config))
    return packed_dir, dense_dir


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("quantized-checkpoints")
    source = make_checkpoint(root / "source", seed=9)
    return {"awq": quantized_checkpoint(source, root, "awq"), "gptq": quantized_checkpoint(source, root, "gptq"),
            "gptq-desc": quantized_checkpoint(source, root, "gptq", desc_act=True),
            "fp8": quantized_checkpoint(source, root, "fp8")}


@pytest.mark.parametrize("name", ["awq", "gptq", "gptq-desc", "fp8"])
def test_float32_logits_equal_transformers_on_the_weights_the_checkpoint_stands_for(checkpoints, name):
    packed, dense = checkpoints[name]
    llm = check_batched_prompt_logits(packed, reference=dense)
    model = llm.engine.model
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    experts = [moe.experts for _, moe in moe_blocks(model)]
    if name == "gptq-desc":  # groups not in runs of columns: dequantized at load, served dense
        assert not linears and not any(isinstance(e, QuantGroupedExperts) for e in experts)
        assert len(model.quantized_checkpoint.dense) > 0
    else:  # served from the checkpoint's own integers: q/k/v, o and every expert; the head was not quantized
        assert len(linears) == 2 * len(model.layers)
        assert all((m.bits, m.float8) == ((8, True) if name == "fp8" else (4, False)) for m in linears)
        assert all(isinstance(e, QuantGroupedExperts) for e in experts)
    check_greedy_with_shared_prefix(packed, True, new=16, reference=dense)


@pytest.mark.parametrize("name", ["awq", "gptq", "fp8"])
def test_bf16_on_the_kernels_meets_the_bf16_bar_against_the_dense_weights(checkpoints, name):
    if not cpu_has_avx512_bf16():
        pytest.skip("needs a CPU with AVX512-BF16")
    packed, dense = checkpoints[name]
    check_quantized_kernels(packed, dense)



def test_a_request_that_contradicts_the_checkpoint_is_refused(checkpoints):
    packed, dense = checkpoints["awq"]
    for asked, checkpoint in (("gptq", packed), ("int8", packed), ("awq", dense)):
        with pytest.raises((ConfigError, ValueError), match="quant"):
            engine(checkpoint, quantization=asked)


@pytest.mark.parametrize("target", ["host", "disk"])
def test_offloading_refuses_experts_it_cannot_keep_packed(checkpoints, target):
    """desc_act groups out of column order come dense: offloading them would mean rounding again."""
    with pytest.raises(ValueError, match="offloading of a gptq checkpoint.*desc_act"):
        engine(checkpoints["gptq-desc"][0], expert_cache_size=2, expert_offload_target=target)



@pytest.mark.parametrize("name,target,dtype", [("awq", "disk", "float32"), ("awq", "host", "float32"),
                                               ("gptq", "host", "float32"), ("fp8", "disk", "float32"),
                                               ("awq", "host", "bfloat16"), ("fp8", "disk", "bfloat16")])
def test_offloaded_quantized_checkpoint_gives_the_resident_outputs(checkpoints, name, target, dtype):
    """float32 on the quantized reference path, bf16 on the quantized kernel."""
    if dtype == "bfloat16" and not cpu_has_avx512_bf16():
        pytest.skip("needs a CPU with AVX512-BF16")
    check_offloaded_like_resident(checkpoints[name][0], target, dtype)


def loaded_bytes_per_expert(llm) -> float:
    """What the loaded experts hold (their weights, scales and zero points; biases aside), per expert of one layer."""
    experts = [moe.experts for _, moe in moe_blocks(llm.engine.model)]
    held = sum(t.numel() * t.element_size() for e in experts
               for name, t in [*e.named_parameters(), *e.named_buffers()] if "bias" not in name)
    return held / sum(e.num_experts for e in experts)


@pytest.mark.parametrize("name", ["awq", "gptq", "gptq-desc", "fp8", "int8", "int4", "experts_int8", "none"])
def test_plan_counts_the_bytes_the_loaded_experts_take(checkpoints, name):
    """`localmoe plan` on the checkpoint directory (a quantized one's own bits and groups read from its config.json;
    the others with --quantization as asked of serve) against the experts that serve loads in bf16."""
    checkpoint, at_load = (checkpoints[name][0], "auto") if name in checkpoints else (checkpoints["awq"][1], name)
    plan = json.loads(plan_command(str(checkpoint), device="cpu:1", quantization=at_load, json_output=True))
    llm = engine(checkpoint, dtype="bfloat16", quantization=None if at_load == "auto" else at_load)
    assert plan["expert_bytes"] == loaded_bytes_per_expert(llm)
    hidden, inter = 64, 96  # tests/checkpoints.py: bf16 experts take 2 x 3 x 64 x 96 bytes
    assert (plan["expert_bytes"] < 2 * 3 * hidden * inter) == (name not in ("gptq-desc", "none"))


def test_plan_refuses_a_quantization_the_checkpoint_contradicts(checkpoints):
    with pytest.raises(PlanError, match="does not match the checkpoint's quant_method 'awq'"):
        plan_command(str(checkpoints["awq"][0]), quantization="int4")


def test_an_auto_expert_cache_holds_as_many_packed_experts_as_the_memory_left_allows(checkpoints, monkeypatch):
    """expert_cache_memory auto with an AWQ checkpoint: a pretend cgroup leaves room for 3 packed experts a layer
    (a third of one dense float32 expert), and the cache takes 3, each the bytes the plan counts."""
    from localmoe.experts import memory_budget

    packed = checkpoints["awq"][0]
    planned = json.loads(plan_command(str(packed), device="cpu:1", json_output=True))["expert_bytes"]
    layers, held, kv = 3, memory_budget.resident_bytes(), 8 * 2**20  # family_parity.engine's pool
    assert 3 * planned < 4 * 3 * 64 * 96
    monkeypatch.setattr(memory_budget, "cgroup_limit",
                        lambda: held + kv + memory_budget.RUNTIME_RESERVE + layers * 3 * planned + 100)
    monkeypatch.setattr(memory_budget, "resident_bytes", lambda: held)
    llm = engine(packed, expert_cache_memory="auto", expert_offload_target="disk", swap_space=0)
    caches = llm.engine.experts.caches
    assert [c.capacity for c in caches] == [3] * layers and {c.expert_bytes for c in caches} == {planned}


"""Weights quantized at load (--quantization int8 / int4 / experts_int8 / fp8): the integers (or float8 values), the
kernels on them, and the engine against transformers on the dequantized weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import make_checkpoint
from family_parity import (check_batched_prompt_logits, check_greedy_with_shared_prefix, check_quantized_kernels,
                           engine, record_logits)
from localmoe import SamplingParams
from localmoe.config import ConfigError, load_config
from localmoe.experts.quantized import QuantGroupedExperts
from localmoe.layers import cpu_kernels
from localmoe.layers.cpu_kernels import QuantTiles, cpu_has_avx512_bf16, expert_tiles, fused_moe, gate_up_paired
from localmoe.layers.moe import moe_blocks
from localmoe.layers.quant_linear import QuantLinear
from localmoe.quant.scheme import quant_scheme
from localmoe.quant.weight import QuantizedWeight, quantize, quantize_fp8

BF16 = torch.bfloat16
avx512_bf16 = [pytest.mark.avx512_bf16,
               pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="needs a CPU with AVX512-BF16")]
KINDS = ["int8", "int4", "fp8"]


def quantized(kind: str, weight: torch.Tensor, group: int | None = None, symmetric: bool = False) -> QuantizedWeight:
    """`weight` as `kind`: 8 or 4-bit integers (int8 symmetric per row unless a group is given) or float8 e4m3."""
    if kind == "fp8":
        return quantize_fp8(weight, group)
    return quantize(weight, 8 if kind == "int8" else 4, group, symmetric or kind == "int8" and group is None)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_weight_holds_exactly_the_integers_scales_and_zeros_it_was_given(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2 ** bits, (3, 32, 64), generator=g).to(torch.uint8)
    scales, zeros = torch.rand(3, 32, 2, generator=g), torch.randint(0, 2 ** bits, (3, 32, 2), generator=g).float()
    weight = QuantizedWeight.of(values, scales, zeros, bits)
    assert weight.packed.shape == (3, 32, 64 * bits // 8) and weight.group_size == 32
    assert torch.equal(weight.values(), values)
    expected = scales.repeat_interleave(32, -1) * (values.float() - zeros.repeat_interleave(32, -1))
    assert torch.equal(weight.dequantize(), expected)
    with pytest.raises(ValueError, match="bits"):
        QuantizedWeight.of(values | 16 if bits == 4 else values, scales, zeros, 2)


def test_a_float8_weight_holds_exactly_its_e4m3_values_and_scales():
    g = torch.Generator().manual_seed(8)
    values = (torch.randn(3, 32, 64, generator=g) * 40).to(torch.float8_e4m3fn)
    scales = torch.rand(3, 32, 2, generator=g)
    weight = QuantizedWeight.of_float8(values, scales)
    assert weight.float8 and weight.bits == 8 and weight.group_size == 32 and weight.shape == (3, 32, 64)
    assert torch.equal(weight.values(), values.view(torch.uint8))
    assert torch.equal(weight.dequantize(), values.float() * scales.repeat_interleave(32, -1))
    assert weight[1].float8 and torch.equal(weight[1].dequantize(), weight.dequantize()[1])


@pytest.mark.parametrize("group", [None, 32])
def test_fp8_quantization_rounds_to_the_nearest_e4m3_number_of_each_rows_scale(group):
    w = torch.randn(48, 128)
    weight = quantize_fp8(w, group)
    scaled = w.unflatten(-1, (-1, weight.group_size)) / weight.scales[..., None]
    assert scaled.abs().amax(dim=-1).allclose(torch.tensor(448.0))  # each row's (group's) largest value is e4m3's
    # within half a step of 3 mantissa bits (and of the smallest subnormal, 2^-9)
    error = (weight.dequantize() - w).abs() / weight.scales.repeat_interleave(weight.group_size, -1)
    assert (error <= torch.maximum(scaled.flatten(-2).abs() / 16, torch.tensor(2.0 ** -10)) + 1e-5).all()


def test_a_weight_widens_exactly_to_more_bits_and_smaller_groups():
    weight = quantize(torch.randn(3, 16, 64), 4, 32, symmetric=False)
    wide = weight.widened(8, 16)
    assert (wide.bits, wide.group_size) == (8, 16) and torch.equal(wide.dequantize(), weight.dequantize())
    for bits, group in ((2, 16), (8, 24)):
        with pytest.raises(ValueError, match="does not widen"):
            weight.widened(bits, group)


@pytest.mark.parametrize("bits,group,symmetric", [(8, None, True), (4, 32, False), (4, 64, True)])
def test_round_to_nearest_quantization_is_within_half_a_step(bits, group, symmetric):
    w = torch.randn(48, 128)
    weight = quantize(w, bits, group, symmetric)
    steps = weight.scales.repeat_interleave(weight.group_size, -1)
    assert ((weight.dequantize() - w).abs() <= steps / 2 + 1e-6).all()
    assert int(weight.values().max()) < 2 ** bits


def test_schemes_by_name_and_refusals():
    assert quant_scheme("int4").group_size == 128 and not quant_scheme("int4").symmetric
    assert quant_scheme("experts_int8").experts_only and quant_scheme("int8", experts_only=True).experts_only
    assert quant_scheme("int4").group_for(96) == 96 and quant_scheme("int4").group_for(640) == 128
    assert quant_scheme("int4").for_head().bits == 8
    assert quant_scheme("fp8").float8 and quant_scheme("fp8").for_head().float8
    assert quant_scheme("fp8", experts_only=True).experts_only
    # a checkpoint format (a GGUF file's too) serves its own integers
    assert quant_scheme(None) is None and quant_scheme("awq") is None and quant_scheme("gguf") is None
    with pytest.raises(ValueError, match="'int3' is not one of"):
        quant_scheme("int3")


def test_the_config_takes_quantization_and_the_model_sections_quantization_type(tmp_path):
    assert load_config(None, {"engine": {"quantization": "int4"}}).engine.quant_scheme.bits == 4
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  quantization_type: int8\n")
    assert load_config(config).engine.quantization == "int8"
    config.write_text("model:\n  quantization_type: fp16\n")
    assert load_config(config).engine.dtype == "float16"
    config.write_text("model:\n  quantization_type: int8\nvllm:\n  quantization: int4\n")
    with pytest.raises(ConfigError, match="quantization_type 'int8'.*int4"):
        load_config(config)
    assert load_config(None, {"engine": {"quantization": "fp8"}}).engine.quant_scheme.float8
    for bad in ({"quantization": "int3"}, {"quantize_experts_only": True}, {"quantization": "awq",
                                                                             "quantize_experts_only": True}):
        with pytest.raises(ConfigError, match="quantization"):
            load_config(None, {"engine": bad})


@pytest.mark.parametrize("kind,group", [("int8", None), ("int4", 128), ("int4", 32), ("fp8", None), ("fp8", 128)])
@pytest.mark.parametrize("tokens", [1, 3, 4, 17])
def test_the_quantized_linear_kernel_equals_dequantize_then_matmul(kind, group, tokens):
    if not cpu_has_avx512_bf16():
        pytest.skip("needs a CPU with AVX512-BF16")
    torch.manual_seed(tokens)
    weight = quantized(kind, 0.05 * torch.randn(200, 256), group)
    x = torch.randn(tokens, 256).to(BF16)
    exact = x.float() @ weight.dequantize().T
    pytorch_bf16 = (x @ weight.dequantize(BF16).T).float()
    ours = cpu_kernels.tiled_linear_quant(x, cpu_kernels.quant_linear_tiles(weight), 200).float()
    assert ours.shape == (tokens, 200)
    assert (ours - exact).abs().max() <= max((pytorch_bf16 - exact).abs().max(), 1e-2)


def perturbed(weight: QuantizedWeight, part: str, index: tuple[int, ...]) -> QuantizedWeight:
    """`weight` with the scale (+0.5) or zero point (+5) at `index` (matrix, row, group) changed."""
    changed = {name: getattr(weight, name).clone() for name in ("packed", "scales", "zeros")}
    changed[part][index] += 0.5 if part == "scales" else 5
    return weight.like(**changed)


@pytest.mark.parametrize("kind,part", [("int8", "scales"), ("int8", "zeros"), ("int4", "scales"), ("int4", "zeros"),
                                       ("fp8", "scales")])
def test_the_linear_kernel_reads_every_scale_and_zero_point(kind, part):
    """One scale or zero point of one row changed: that output column alone moves (fp8 has no zero points)."""
    if not cpu_has_avx512_bf16():
        pytest.skip("needs a CPU with AVX512-BF16")
    weight = quantized(kind, 0.05 * torch.randn(80, 128), 64)
    x = torch.randn(2, 128).to(BF16)
    before = cpu_kernels.tiled_linear_quant(x, cpu_kernels.quant_linear_tiles(weight), 80)
    after = cpu_kernels.tiled_linear_quant(x, cpu_kernels.quant_linear_tiles(perturbed(weight, part, (37, 1))), 80)
    moved = (before != after).any(dim=0)
    assert moved[37] and moved.sum() == 1


def moe_reference(x, ids, weights, w13: QuantizedWeight, w2: QuantizedWeight) -> torch.Tensor:
    """The MoE feed-forward in float32 on the dequantized experts, token by token."""
    out = torch.zeros(x.shape)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            gate, up = (w13.dequantize()[ids[t, k]] @ x[t].float()).chunk(2)
            out[t] += weights[t, k] * (w2.dequantize()[ids[t, k]] @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.mark.parametrize("kinds,group", [(("int8", "int8"), None), (("int4", "int4"), 16), (("fp8", "fp8"), None),
                                         (("fp8", "fp8"), 16), (("int4", "int8"), 16), (("int8", "int4"), 16)])
@pytest.mark.parametrize("tokens", [1, 5, 19])
def test_the_quantized_moe_kernel_is_no_less_accurate_than_the_bf16_kernel_on_dequantized_experts(kinds, group,
                                                                                                   tokens):
    """Shapes with a tile of 16 rows after full ones (hidden 80, 48 units) and several passes per expert; w13 and w2
    may have different bits (a GGUF Q4_K_M file's Q4_K gate/up beside Q6_K down)."""
    if not cpu_has_avx512_bf16():
        pytest.skip("needs a CPU with AVX512-BF16")
    torch.manual_seed(tokens)
    x = torch.randn(tokens, 80).to(BF16)
    ids, weights = torch.stack([torch.randperm(4)[:2] for _ in range(tokens)]), torch.rand(tokens, 2)
    w13, w2 = (quantized(kind, 0.1 * torch.randn(4, *shape), group) for kind, shape in zip(kinds, ((96, 80), (80, 48))))
    reference = moe_reference(x, ids, weights, w13, w2)
    bf16 = fused_moe(x, ids, weights, *expert_tiles(w13.dequantize(BF16), w2.dequantize(BF16))).float()
    ours = fused_moe(x, ids, weights, QuantTiles.of(w13, gate_up_paired), QuantTiles.of(w2)).float()
    assert (ours - reference).abs().max() <= max((bf16 - reference).abs().max(), 1e-2)


@pytest.mark.parametrize("kind", KINDS)
def test_the_moe_kernel_reads_each_experts_own_scales_and_zero_points(kind):
    """A scale of expert 1's up half (w13) and a zero point (fp8: a scale) of expert 2's w2 changed: only the tokens
    routed there move, and for w2 only that output column."""
    if not cpu_has_avx512_bf16():
        pytest.skip("needs a CPU with AVX512-BF16")
    torch.manual_seed(len(kind))
    w13, w2 = (quantized(kind, 0.1 * torch.randn(4, *shape), 32) for shape in ((192, 64), (64, 96)))
    x, weights = torch.randn(4, 64).to(BF16), torch.rand(4, 2)
    ids = torch.tensor([[0, 1], [2, 3], [1, 3], [0, 3]])
    def run(a: QuantizedWeight, b: QuantizedWeight) -> torch.Tensor:
        return fused_moe(x, ids, weights, QuantTiles.of(a, gate_up_paired), QuantTiles.of(b), float_out=True)

    before = run(w13, w2)
    moved = (run(perturbed(w13, "scales", (1, 100, 1)), w2) != before).any(dim=1)
    assert moved.tolist() == [True, False, True, False]
    moved = run(w13, perturbed(w2, "scales" if kind == "fp8" else "zeros", (2, 9, 0))) != before
    assert moved.any(dim=1).tolist() == [False, True, False, False]
    assert moved.any(dim=0).nonzero().flatten().tolist() == [9]


def dequantized_checkpoint(source: Path, target: Path, name: str) -> Path:
    """A float32 copy of `source` whose weights are what --quantization `name` serves, dequantized: what
    transformers runs as the reference. Quantization is per row, so each checkpoint tensor quantizes as its rows do
    stacked."""
    scheme = quant_scheme(name)
    shutil.copytree(source, target)
    tensors = load_file(source / "model.safetensors")
    for key, tensor in tensors.items():
        dense = not any(part in key for part in ("embed_tokens", "norm", ".gate."))
        if tensor.dim() == 2 and (".experts." in key or (dense and not scheme.experts_only)):
            layer_scheme = scheme.for_head() if key.startswith("lm_head") else scheme
            tensors[key] = layer_scheme.quantize(tensor).dequantize(torch.float32)
        else:
            tensors[key] = tensor.float()
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def quantized_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A bf16 checkpoint (as deployed: the float32 and the bf16 engine then quantize the same numbers) and the
    dequantized float32 references."""
    root = tmp_path_factory.mktemp("quantized")
    source = make_checkpoint(root / "bf16", seed=3)
    weights = source / "model.safetensors"
    save_file({k: t.to(BF16) for k, t in load_file(weights).items()}, weights, metadata={"format": "pt"})
    refs = {name: dequantized_checkpoint(source, root / name, name) for name in ("int8", "int4", "experts_int8", "fp8")}
    return {"source": source, **refs}


@pytest.mark.parametrize("name", ["int8", "int4", "experts_int8", "fp8"])
def test_float32_logits_and_greedy_tokens_equal_transformers_on_the_dequantized_weights(quantized_checkpoints, name):
    source, reference = quantized_checkpoints["source"], quantized_checkpoints[name]
    llm = check_batched_prompt_logits(source, reference=reference, quantization=name)
    model = llm.engine.model
    assert all(isinstance(moe.experts, QuantGroupedExperts) for _, moe in moe_blocks(model))
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == (0 if name == "experts_int8" else 2 * len(model.layers) + 1)  # qkv, o; the head
    check_greedy_with_shared_prefix(source, True, new=16, reference=reference, quantization=name)


def test_quantization_changes_the_logits(quantized_checkpoints):
    """The reference checks above compare against quantized weights, not the checkpoint's own; and the weights
    take fewer bytes."""
    prompt, params = {"prompt_token_ids": list(range(3, 25))}, SamplingParams(max_tokens=1, temperature=0)
    logits, weights = [], []
    for quantization in (None, "int4"):
        llm = engine(quantized_checkpoints["source"], quantization=quantization)
        steps = record_logits(llm)
        llm.generate(prompt, params)
        logits.append(steps[0][0])
        weights.append(llm.engine.snapshot.memory["weights_bytes"])
    assert (logits[0] - logits[1]).abs().max() > 1e-2
    assert weights[1] < weights[0] / 2  # /v1/stats/memory counts the packed bytes (float32 here: over 4x less)


@pytest.mark.parametrize("name", ["int8", "int4", "fp8"])
def test_bf16_on_the_quantized_kernels_meets_the_bf16_bar_against_the_dequantized_weights(quantized_checkpoints,
                                                                                          name):
    if not cpu_has_avx512_bf16():
        pytest.skip("needs a CPU with AVX512-BF16")
    check_quantized_kernels(quantized_checkpoints["source"], quantized_checkpoints[name], quantization=name)


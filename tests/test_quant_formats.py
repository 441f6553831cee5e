"""Quantized checkpoint formats: each layer packed here by hand (Python integers and explicit shifts, following the
format's published layout) or by the compressed-tensors library itself comes back as exactly the integers, scales and
zero points it was packed from; detection, refusals and the layers a checkpoint leaves unquantized."""

from __future__ import annotations

import pytest
import torch

from localmoe.quant.formats import ROUTERS, Awq, CompressedTensors, Fp8, Gptq, checkpoint_format
from localmoe.quant.weight import QuantizedWeight

N, K, GROUP = 16, 64, 32  # output features, input features, columns a group
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: bits 4i.. of word c hold column 8c + AWQ_PACK_ORDER[i]


def int32(word: int) -> int:
    word &= 0xFFFFFFFF
    return word - (1 << 32) if word >> 31 else word


def pack_along_rows(ints: list[list[int]], bits: int) -> torch.Tensor:
    """[R * bits / 32][C] words, row (32 / bits) r + i of `ints` in bits `bits` i of word r (GPTQ's qweight)."""
    per = 32 // bits
    return torch.tensor([[int32(sum(ints[per * r + i][c] << bits * i for i in range(per))) for c in range(len(ints[0]))]
                         for r in range(len(ints) // per)], dtype=torch.int32)


def pack_along_columns(ints: list[list[int]], bits: int, order: list[int] | None = None) -> torch.Tensor:
    """[R][C * bits / 32] words, column (32 / bits) c + order[i] of `ints` in bits `bits` i of word c."""
    per = 32 // bits
    order = order or list(range(per))
    return torch.tensor([[int32(sum(row[per * c + order[i]] << bits * i for i in range(per)))
                          for c in range(len(row) // per)] for row in ints], dtype=torch.int32)


def known_weight(bits: int, seed: int, groups: int = K // GROUP):
    """q [N, K], scales and zero points [N, groups] (zero points 0 and 2^bits - 1 included)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2 ** bits, (N, K), generator=g)
    zeros = torch.randint(0, 2 ** bits, (N, groups), generator=g)
    zeros[0, 0], zeros[1, 0] = 0, 2 ** bits - 1
    scales = (torch.rand(N, groups, generator=g) + 0.01).half().float()
    return q, scales, zeros


def dequantized(q, scales, zeros, group_of_column):
    return scales[:, group_of_column] * (q.float() - zeros[:, group_of_column].float())


def check_exact(weight, q, scales, zeros, bits):
    assert isinstance(weight, QuantizedWeight) and weight.bits == bits and weight.shape == q.shape
    assert torch.equal(weight.values(), q.to(torch.uint8))
    assert torch.equal(weight.scales, scales) and torch.equal(weight.zeros, zeros.float())
    columns = torch.arange(q.shape[1]) // (q.shape[1] // scales.shape[1])
    assert torch.equal(weight.dequantize(), dequantized(q, scales, zeros, columns))


def test_awq_gemm_comes_back_exactly_from_its_interleaved_nibbles():
    q, scales, zeros = known_weight(4, seed=0)
    tensors = {"qweight": pack_along_columns(q.T.tolist(), 4, AWQ_PACK_ORDER),
               "qzeros": pack_along_columns(zeros.T.tolist(), 4, AWQ_PACK_ORDER),
               "scales": scales.T.half()}
    assert tensors["qweight"].shape == (K, N // 8) and tensors["qzeros"].shape == (K // GROUP, N // 8)
    check_exact(Awq("awq").combine(tensors), q, scales, zeros, 4)


def gptq_tensors(q, scales, zeros, bits, v1, g_idx=None):
    """As GPTQModel saves them: zero points packed, then for v1 each word less 0x11111111 (int4) as a 32-bit word."""
    qzeros = pack_along_columns(zeros.T.tolist(), bits)
    if v1:
        ones = sum(1 << shift for shift in range(0, 32, bits))
        qzeros = torch.tensor([[int32(word - ones) for word in row] for row in qzeros.tolist()], dtype=torch.int32)
    g_idx = torch.arange(q.shape[1]) // GROUP if g_idx is None else g_idx
    return {"qweight": pack_along_rows(q.T.tolist(), bits), "qzeros": qzeros, "scales": scales.T.half(),
            "g_idx": g_idx.int()}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("v1", [True, False])
def test_gptq_comes_back_exactly_in_both_checkpoint_formats(bits, v1):
    q, scales, zeros = known_weight(bits, seed=bits + v1)
    tensors = gptq_tensors(q, scales, zeros, bits, v1)
    assert tensors["qweight"].shape == (K * bits // 32, N) and tensors["qzeros"].shape == (K // GROUP, N * bits // 32)
    check_exact(Gptq("gptq", bits=bits, v1=v1).combine(tensors), q, scales, zeros, bits)
    without_g_idx = {name: t for name, t in tensors.items() if name != "g_idx"}
    check_exact(Gptq("gptq", bits=bits, v1=v1).combine(without_g_idx), q, scales, zeros, bits)


@pytest.mark.parametrize("bits,stored", [(4, 0x77777777), (8, 0x7F7F7F7F)])
def test_a_symmetric_gptq_v1_checkpoint_stores_its_zero_point_less_one(bits, stored):
    q, scales, _ = known_weight(bits, seed=3)
    tensors = gptq_tensors(q, scales, torch.zeros(N, K // GROUP, dtype=torch.long), bits, v1=False)
    tensors["qzeros"] = torch.full_like(tensors["qzeros"], stored)
    weight = Gptq("gptq", bits=bits, v1=True).combine(tensors)
    assert torch.equal(weight.zeros, torch.full((N, K // GROUP), 2.0 ** (bits - 1)))


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_with_desc_act_groups_is_dequantized_column_by_column(bits):
    q, scales, zeros = known_weight(bits, seed=5, groups=4)
    g_idx = (torch.arange(K) // (K // 4))[torch.randperm(K, generator=torch.Generator().manual_seed(6))]
    dense = Gptq("gptq", bits=bits).combine(gptq_tensors(q, scales, zeros, bits, v1=True, g_idx=g_idx))
    assert not isinstance(dense, QuantizedWeight) and dense.dtype == torch.float32
    assert torch.equal(dense, dequantized(q, scales, zeros, g_idx))
    assert not torch.equal(dense, dequantized(q, scales, zeros, torch.arange(K) // (K // 4)))


def fp8_weight(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(torch.float8_e4m3fn)


@pytest.mark.parametrize("columns", [256, 300])
def test_deepseek_fp8_block_scales_cover_blocks_of_128_smaller_at_the_edges(columns):
    """Blocks that divide the columns are served as float8 with a scale per row and block of columns (the block's
    scale repeated over its rows); others (a last block of 44 columns) dense."""
    blocks = -(-columns // 128)
    weight, scale = fp8_weight(200, columns, seed=7), torch.rand(2, blocks) + 0.5
    expected = weight.float()
    for i in range(2):
        for j in range(blocks):
            expected[128 * i:128 * (i + 1), 128 * j:128 * (j + 1)] *= scale[i, j]
    fp8 = Fp8("fp8", block=(128, 128))
    combined = fp8.combine({"weight": weight, "weight_scale_inv": scale})
    if columns % 128:
        assert not isinstance(combined, QuantizedWeight) and torch.equal(combined, expected)
    else:
        assert combined.float8 and combined.group_size == 128
        assert torch.equal(combined.values(), weight.view(torch.uint8))  # the checkpoint's own bytes
        assert torch.equal(combined.dequantize(), expected)
    with pytest.raises(ValueError, match=r"do not tile"):
        fp8.combine({"weight": weight, "weight_scale_inv": scale[:, :1]})


def test_fp8_scales_per_tensor_and_per_row():
    weight, rows = fp8_weight(N, K, seed=8), torch.rand(N, 1) + 0.5
    per_tensor = Fp8("fp8").combine({"weight": weight, "weight_scale": torch.tensor(0.25)})
    per_row = Fp8("fbgemm_fp8").combine({"weight": weight, "weight_scale": rows})
    assert per_tensor.float8 and torch.equal(per_tensor.values(), weight.view(torch.uint8))
    assert torch.equal(per_tensor.dequantize(), weight.float() / 4)
    assert torch.equal(per_row.dequantize(), weight.float() * rows)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        Fp8("fp8").combine({"weight": weight.float(), "weight_scale": rows})


def test_transformers_fp8_experts_fused_or_saved_one_per_expert_with_the_layers_scales():
    """FP8Experts' gate_up_proj [E, 2I, H] with block scales [E, ceil(2I / 64), H / 32]: as one tensor, and as its
    save_pretrained writes it (w1 / w3 per expert, the scales fused), where a block of rows straddles gate and up."""
    experts, inter, hidden = 3, 96, 64
    fused, scale = fp8_weight(experts * 2 * inter, hidden, seed=10).view(experts, 2 * inter, hidden), \
        torch.rand(experts, 3, 2) + 0.5
    expected = fused.float() * scale.repeat_interleave(64, 1).repeat_interleave(32, 2)
    fp8 = Fp8("fp8", block=(64, 32))
    layer = "model.layers.0.block_sparse_moe.experts"
    assert fp8.split(f"{layer}.gate_up_proj_scale_inv") == (f"{layer}.gate_up_proj", "weight_scale_inv")
    whole = fp8.combine({"weight": fused, "weight_scale_inv": scale})
    assert whole.float8 and whole.shape == fused.shape and torch.equal(whole.dequantize(), expected)
    held = {f"{layer}.{e}.{name}.weight": {"weight": fused[e, half * inter:(half + 1) * inter]}
            for e in range(experts) for half, name in enumerate(("w1", "w3"))}
    held[f"{layer}.gate_up_proj"] = {"weight_scale_inv": scale}
    fp8.regroup(held)
    assert f"{layer}.gate_up_proj" not in held
    for e in range(experts):
        for half, name in enumerate(("w1", "w3")):
            piece = fp8.combine(held[f"{layer}.{e}.{name}.weight"])
            assert piece.float8 and torch.equal(piece.values(), fused[e, half * inter:][:inter].view(torch.uint8))
            assert torch.equal(piece.dequantize(), expected[e, half * inter:][:inter])


COMPRESSED = [  # format, bits, symmetric, strategy
    ("pack-quantized", 4, False, "group"), ("pack-quantized", 4, True, "group"), ("pack-quantized", 8, True, "channel"),
    ("pack-quantized", 4, False, "channel"), ("pack-quantized", 4, False, "tensor"),
    ("int-quantized", 8, True, "channel"), ("naive-quantized", 8, False, "group")]


@pytest.mark.parametrize("layout,bits,symmetric,strategy", COMPRESSED)
def test_compressed_tensors_come_back_exactly_from_the_librarys_own_compressor(layout, bits, symmetric, strategy):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    groups = {"group": K // GROUP, "channel": 1, "tensor": 1}[strategy]
    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy=strategy,
                            group_size=GROUP if strategy == "group" else None)
    activations = QuantizationArgs(num_bits=8, strategy="token", dynamic=True) if layout == "int-quantized" else None
    scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=activations)
    g = torch.Generator().manual_seed(bits + groups)
    rows = N if strategy != "tensor" else 1
    signed = torch.randint(-2 ** (bits - 1), 2 ** (bits - 1), (N, K), generator=g)
    zero_point = torch.zeros(rows, groups, dtype=torch.int8) if symmetric else torch.randint(
        -2 ** (bits - 1), 2 ** (bits - 1), (rows, groups), generator=g).to(torch.int8)
    scale = 2.0 ** torch.randint(-6, 2, (rows, groups), generator=g).float()  # powers of two: w is exact
    per_column = torch.arange(K) // (K // groups)
    weight = (signed - zero_point[:, per_column]) * scale[:, per_column]
    state = {"weight": weight, "weight_scale": scale.reshape(-1) if strategy == "tensor" else scale}
    if not symmetric:
        state["weight_zero_point"] = zero_point.reshape(-1) if strategy == "tensor" else zero_point
    compressor = BaseCompressor.get_value_from_registry(layout)
    stored = compressor.compress(state, scheme)
    reference = compressor.decompress(stored, scheme)["weight"]
    assert torch.equal(reference, weight)

    config = QuantizationConfig(config_groups={"group_0": scheme}, format=layout).model_dump(mode="json")
    found = checkpoint_format(config, "compressed-tensors")
    assert isinstance(found, CompressedTensors)
    assert set(stored) <= set(found.suffixes), set(stored) - set(found.suffixes)
    zeros = (zero_point.int() + 2 ** (bits - 1)).expand(N, groups)
    check_exact(found.combine(stored), signed + 2 ** (bits - 1), scale.expand(N, groups), zeros, bits)
    assert torch.equal(found.combine(stored).dequantize(), reference)


@pytest.mark.parametrize("strategy", ["channel", "block"])
def test_compressed_tensors_fp8_matches_the_librarys_decompression(strategy):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    scheme = preset_name_to_scheme("FP8_BLOCK" if strategy == "block" else "FP8_DYNAMIC", ["Linear"])
    weight = torch.randn(200, 300, generator=torch.Generator().manual_seed(9))
    scale = torch.rand(2, 3) + 0.5 if strategy == "block" else torch.rand(200, 1) + 0.5
    stored = FloatQuantizationCompressor.compress({"weight": weight, "weight_scale": scale}, scheme)
    reference = FloatQuantizationCompressor.decompress(stored, scheme)["weight"]
    config = QuantizationConfig(config_groups={"group_0": scheme}, format="float-quantized").model_dump(mode="json")
    found = checkpoint_format(config, None)
    assert found.block == ((128, 128) if strategy == "block" else None)
    combined = found.combine(stored)  # 300 columns: the blocks of 128 do not divide them, dense
    assert torch.equal(combined if strategy == "block" else combined.dequantize(), reference.float())


def test_each_quant_method_is_detected_and_checked_against_the_request():
    awq = {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "GEMM", "zero_point": True}
    assert isinstance(checkpoint_format(awq, None), Awq) and isinstance(checkpoint_format(awq, "awq_marlin"), Awq)
    assert isinstance(checkpoint_format({"quant_method": "awq", "bits": 4, "format": "gemm"}, "awq"), Awq)
    gptq = checkpoint_format({"quant_method": "gptq", "bits": 8, "checkpoint_format": "gptq_v2"}, "gptq")
    assert isinstance(gptq, Gptq) and gptq.bits == 8 and not gptq.v1
    assert checkpoint_format({"quant_method": "gptq", "bits": 4, "sym": True}, "none").v1
    deepseek = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}
    assert checkpoint_format(deepseek, "fp8") == Fp8("fp8", skip=(*ROUTERS, "lm_head"), block=(128, 128))
    assert checkpoint_format({"quant_method": "fp8", "activation_scheme": "static"}, None).block is None
    assert checkpoint_format(None, None) is None and checkpoint_format(None, "int4") is None
    assert checkpoint_format(None, "fp8") is None  # fp8 on an unquantized checkpoint: quantized at load
    with pytest.raises(ValueError, match="'gptq' does not match the checkpoint's quant_method 'awq'"):
        checkpoint_format(awq, "gptq")
    with pytest.raises(ValueError, match="'int4' does not match the checkpoint's quant_method 'fp8'"):
        checkpoint_format(deepseek, "int4")
    with pytest.raises(ValueError, match="'awq' reads a quantized checkpoint.*no quantization_config"):
        checkpoint_format(None, "awq")


@pytest.mark.parametrize("config,named", [
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "AWQ version 'gemv'"),
    ({"quant_method": "awq", "bits": 4, "format": "gemv_fast"}, "AWQ version 'gemv_fast'"),
    ({"quant_method": "awq", "bits": 8, "version": "gemm"}, "AWQ with 8 bits"),
    ({"quant_method": "gptq", "bits": 3}, "GPTQ with 3 bits"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "GPTQ checkpoint_format 'marlin'"),
    ({"quant_method": "gptq", "bits": 4, "dynamic": {r"+:.*down_proj": {"bits": 8}}}, "override.*down_proj.*8 bits"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "fp8 with fmt 'e5m2'"),
    ({"quant_method": "fp8", "expert_dtype": "fp4"}, "fp8 with expert_dtype 'fp4'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes'"),
    ({"quant_method": "mxfp4"}, "quant_method 'mxfp4'"),
    ({"quant_method": "compressed-tensors", "format": "marlin-24", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group", "group_size": 128}}}},
     r"group 'group_0' \(int4 weights, strategy 'group', format 'marlin-24'\)"),
    ({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {"group_0": {
        "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16}}}},
     "float4 weights, strategy 'tensor_group'"),
    ({"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {"group_0": {
        "weights": {"num_bits": 4, "strategy": "channel"}}}}, "int4 weights, strategy 'channel', format 'int-quant"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "sparsity_config": {"format": "sparse-24"},
      "config_groups": {}}, "sparsity 'sparse-24'"),
])
def test_methods_and_schemes_we_do_not_serve_are_refused_by_name(config, named):
    with pytest.raises(ValueError, match=named):
        checkpoint_format(config, None)


def test_layers_left_unquantized_by_each_format():
    awq = checkpoint_format({"quant_method": "awq", "bits": 4, "modules_to_not_convert": ["gate"]}, None)
    assert awq.is_quantized("model.layers.0.mlp.gate_proj") and awq.is_quantized("model.layers.0.mlp.experts.3.w1")
    assert not awq.is_quantized("model.layers.0.mlp.gate") and not awq.is_quantized("lm_head")
    gptq = checkpoint_format({"quant_method": "gptq", "bits": 4, "lm_head": True,
                              "dynamic": {r"-:model\.layers\.1\..*": {}}}, None)
    assert gptq.is_quantized("lm_head") and gptq.is_quantized("model.layers.0.self_attn.q_proj")
    assert not gptq.is_quantized("model.layers.1.self_attn.q_proj") and not gptq.is_quantized("model.layers.0.mlp.gate")
    assert not gptq.is_quantized("model.layers.0.block_sparse_moe.gate")
    assert gptq.is_quantized("model.layers.0.block_sparse_moe.experts.0.w1")
    assert not checkpoint_format({"quant_method": "gptq", "bits": 4}, None).is_quantized("lm_head")
    ct = checkpoint_format({"quant_method": "compressed-tensors", "format": "pack-quantized",
                            "ignore": ["lm_head", r"re:.*mlp\.gate$"], "config_groups": {"group_0": {
                                "targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 128}}}}, None)
    assert ct.is_quantized("model.layers.0.mlp.gate_proj") and ct.is_quantized("model.layers.0.mlp.experts.0.up_proj")
    assert not ct.is_quantized("model.layers.0.mlp.gate") and not ct.is_quantized("lm_head")
    experts_only = checkpoint_format({"quant_method": "compressed-tensors", "format": "pack-quantized",
                                      "config_groups": {"group_0": {"targets": [r"re:.*mlp\.experts\..*"],
                                                                    "weights": {"num_bits": 4, "group_size": 128}}}},
                                     None)
    assert experts_only.is_quantized("model.layers.2.mlp.experts.7.down_proj")
    assert not experts_only.is_quantized("model.layers.2.self_attn.o_proj")
    fp8 = checkpoint_format({"quant_method": "fp8", "weight_block_size": [128, 128],
                             "ignored_layers": ["model.layers.0.self_attn.kv_b_proj"]}, None)
    assert not fp8.is_quantized("model.layers.0.self_attn.kv_b_proj")
    assert fp8.is_quantized("model.layers.1.self_attn.kv_b_proj")
    assert not fp8.is_quantized("model.layers.3.mlp.gate") and fp8.is_quantized("model.layers.0.mlp.gate_proj")
    assert not fp8.is_quantized("lm_head") and fp8.is_quantized("model.layers.3.mlp.shared_experts.up_proj")

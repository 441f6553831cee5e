"""GGUF files of the Mixtral family served end to end. A tiny random Mixtral is converted by llama.cpp's own
convert_hf_to_gguf.py (F32 and Q8_0), and a Q4_K_M-like file is written from the F32 one with Q4_K and Q6_K blocks
of random bytes (the gguf library has no quantizer for either). LocalMoE's logits equal transformers' on the weights
the gguf library dequantizes from the same file, with the Q8_0 and Q4_K blocks served packed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import (
    GGML_QUANT_SIZES, MODEL_ARCH, GGMLQuantizationType, GGUFReader, GGUFWriter, ReaderTensor, get_tensor_name_map,
)
from gguf.quants import dequantize, quantize
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models

from checkpoints import VOCAB, make_checkpoint
from family_parity import check_batched_prompt_logits, check_offloaded_like_resident, check_quantized_kernels, engine
from localmoe.config import ConfigError
from localmoe.experts.quantized import QuantGroupedExperts
from localmoe.layers.cpu_kernels import cpu_has_avx512_bf16
from localmoe.layers.moe import moe_blocks
from localmoe.layers.quant_linear import QuantLinear
from localmoe.models.builtin import save_tokenizer
from localmoe.models.gguf_file import read_blocks, read_gguf
from localmoe.models.loader import load_model
from localmoe.planner import PlanError, plan_command

F32, F64, F16, BF16 = (GGMLQuantizationType[name] for name in ("F32", "F64", "F16", "BF16"))
Q8_0, Q4_K, Q5_K, Q6_K = (GGMLQuantizationType[name] for name in ("Q8_0", "Q4_K", "Q5_K", "Q6_K"))
LLAMA_CPP_PYTHON = "0.3.36"  # its sdist vendors llama.cpp: the converter, the `conversion` package and gguf-py
VENDORED = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp"
# each type's per-block fp16 scales: (byte offset, typical size), drawn so that weights are about 0.1
FP16_FIELDS = {Q4_K: ((0, 4e-4), (2, 3e-3)), Q5_K: ((0, 2e-4), (2, 3e-3)), Q6_K: ((208, 1e-4),)}


@pytest.fixture(scope="session")
def converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py beside what it imports, from llama-cpp-python's sdist on PyPI, extracted
    once into the user's cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "localmoe" / "llama.cpp"
    root = cache / LLAMA_CPP_PYTHON
    if (root / VENDORED / "convert_hf_to_gguf.py").exists():
        return root / VENDORED
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as download:
        run("-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--no-deps", "--no-binary", ":all:",
            "-d", download)
        wanted = tuple(f"{VENDORED}/{part}" for part in ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/"))
        with tarfile.open(next(Path(download).glob("*.tar.gz"))) as sdist:
            members = [m for m in sdist.getmembers() if m.name.startswith(wanted)]
            sdist.extractall(Path(download) / "tree", members, filter="data")
        try:
            (Path(download) / "tree").rename(root)
        except OSError:  # another session extracted it first
            pass
    return root / VENDORED


def converter_view(source: Path, directory: Path) -> Path:
    """`source`'s config and weights beside a Llama-style tokenizer (a BPE over byte-fallback tokens, as Mixtral's
    tokenizer.json): the converter fingerprints other BPE tokenizers and refuses ones it does not know, such as our
    byte-level one. The engine reads the tokenizer from `source` (--tokenizer)."""
    directory.mkdir()
    for name in ("config.json", "model.safetensors"):
        (directory / name).symlink_to(source / name)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁"]
    tokens += [chr(ord("a") + i) for i in range(VOCAB - len(tokens))]
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [], unk_token="<unk>", byte_fallback=True))
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens(tokens[:3])
    save_tokenizer(tokenizer, directory)
    return directory


def run(*args: str, **env: str) -> None:
    """Python with `args`, its error output shown where it fails."""
    result = subprocess.run([sys.executable, *args], env={**os.environ, **env}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def convert(converter: Path, view: Path, outtype: str, out: Path) -> Path:
    run(str(converter / "convert_hf_to_gguf.py"), str(view), "--outtype", outtype, "--outfile", str(out),
        PYTHONPATH=str(converter / "gguf-py"))
    return out


def random_blocks(shape: tuple[int, ...], qtype: GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    """Random bytes laid out as `qtype`'s blocks for values [..., N, K] (the reader's byte shape), their fp16 scales
    drawn small: random bytes there could be inf or NaN."""
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (*shape[:-1], shape[-1] // block, size), dtype=np.uint8)
    for at, scale in FP16_FIELDS[qtype]:
        halves = (scale * rng.uniform(0.5, 1.5, blocks.shape[:-1])).astype(np.float16)
        blocks[..., at:at + 2] = halves[..., None].view(np.uint8)
    return blocks.reshape(*shape[:-1], -1)


Stored = list[tuple[str, np.ndarray, GGMLQuantizationType]]  # (name, data as the reader holds it, type)


def keep(tensor: ReaderTensor) -> Stored:
    return [(tensor.name, tensor.data, tensor.tensor_type)]


def rewrite(source: Path, out: Path, change: Callable[[ReaderTensor], Stored] = keep, arch: str = "llama",
            drop: str = "") -> Path:
    """A copy of the GGUF file `source` with each tensor replaced by change(tensor) ((name, data, type) triples),
    its architecture renamed to `arch` and the metadata key `drop` left out."""
    reader, writer = GGUFReader(source), GGUFWriter(out, arch)
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key not in ("general.architecture", drop):
            sub_type = field.types[-1] if len(field.types) > 1 else None
            writer.add_key_value(re.sub("^llama[.]", f"{arch}.", key), field.contents(), field.types[0], sub_type)
    for tensor in reader.tensors:
        for name, data, qtype in change(tensor):
            writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def q4_k_m_like(f32: Path, out: Path) -> Path:
    """The F32 file with random Q4_K blocks where llama.cpp's Q4_K_M puts them, and Q6_K where it gives some layers
    more bits (here layer 1's attn_v and ffn_down_exps) and for the output; norms and routers stay F32."""
    rng = np.random.default_rng(6)

    def change(tensor: ReaderTensor) -> Stored:
        if tensor.data.ndim == 1 or "ffn_gate_inp" in tensor.name:
            return [(tensor.name, tensor.data, F32)]
        more_bits = tensor.name == "output.weight" or re.fullmatch(r"blk\.1\.(attn_v|ffn_down_exps)\.weight",
                                                                    tensor.name)
        qtype = Q6_K if more_bits else Q4_K
        return [(tensor.name, random_blocks(tensor.data.shape, qtype, rng), qtype)]
    return rewrite(f32, out, change)


def unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of llama.cpp's LlamaModel.permute (reshape(heads, 2, d/2, K), swap axes 1 and 2)."""
    n = weight.shape[0]
    return weight.reshape(heads, n // heads // 2, 2, -1).swapaxes(1, 2).reshape(weight.shape)


def dense_reference(path: Path, source: Path, directory: Path) -> Path:
    """`source` with the weights the gguf library dequantizes from `path`: each tensor of `source` is found under the
    name gguf's own name map gives it (an expert's, at its index in the stack), llama.cpp's q/k permutation undone."""
    shutil.copytree(source, directory)
    config = json.loads((source / "config.json").read_text())
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    stored = {t.name: torch.tensor(dequantize(t.data, t.tensor_type)) for t in GGUFReader(path).tensors}
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    state = {}
    with safe_open(source / "model.safetensors", "pt") as f:
        for name in f.keys():
            expert = re.search(r"experts\.(\d+)\.", name)
            value = stored[names.get_name(re.sub(r"experts\.\d+\.", "experts.", name), try_suffixes=(".weight",))]
            value = value[int(expert[1])] if expert else value
            projection = name.split(".")[-2]
            state[name] = (unpermute(value, heads[projection]) if projection in heads else value).contiguous()
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def files(converter, tmp_path_factory) -> tuple[Path, dict[str, tuple[Path, Path]]]:
    """(the source checkpoint, {kind: (GGUF file, its dense reference checkpoint)}); K a multiple of 256 for Q4_K."""
    root = tmp_path_factory.mktemp("gguf")
    source = make_checkpoint(root / "source", seed=4, hidden_size=256, intermediate_size=256, num_hidden_layers=2)
    view = converter_view(source, root / "view")
    paths = {kind: convert(converter, view, kind, root / f"{kind}.gguf") for kind in ("f32", "q8_0")}
    paths["q4_k_m"] = q4_k_m_like(paths["f32"], root / "q4_k_m.gguf")
    return source, {kind: (path, dense_reference(path, source, root / f"{kind}-dense"))
                    for kind, path in paths.items()}


def test_q8_0_blocks_map_exactly():
    data = quantize(np.random.default_rng(0).normal(size=(3, 40, 96)).astype(np.float32), Q8_0)
    dense, weight = read_blocks(data, Q8_0)
    assert (weight.bits, weight.group_size, tuple(weight.shape)) == (8, 32, (3, 40, 96))
    assert torch.equal(dense, torch.tensor(dequantize(data, Q8_0))) and torch.equal(dense, weight.dequantize())


def test_q4_k_blocks_map_within_float32_rounding_and_flat_groups_exactly():
    data = random_blocks((40, 512), Q4_K, np.random.default_rng(1))
    data.reshape(40, 2, 144)[::3, 0, :2] = 0  # d = 0: each group of those super-blocks holds -dmin m
    expected = torch.tensor(dequantize(data, Q4_K))
    dense, weight = read_blocks(data, Q4_K)
    assert (weight.bits, weight.group_size) == (4, 32) and torch.equal(dense, weight.dequantize())
    offsets = (weight.scales * weight.zeros).abs().repeat_interleave(32, dim=-1)
    assert ((dense - expected).abs() <= 1e-6 * (expected.abs() + offsets)).all()
    assert torch.equal(dense.view(40, 2, 256)[::3, 0], expected.view(40, 2, 256)[::3, 0])


def test_q6_k_blocks_map_exactly():
    data = random_blocks((40, 512), Q6_K, np.random.default_rng(3))
    dense, weight = read_blocks(data, Q6_K)
    assert (weight.bits, weight.group_size) == (8, 16) and torch.equal(dense, weight.dequantize())
    assert torch.equal(dense, torch.tensor(dequantize(data, Q6_K)))
    assert int(weight.values().max()) < 64 and bool((weight.zeros == 32).all())


@pytest.mark.parametrize("qtype", [F16, BF16, Q5_K])
def test_other_types_come_dense_as_the_gguf_library_reads_them(qtype):
    rng = np.random.default_rng(2)
    data = random_blocks((8, 256), qtype, rng) if qtype in FP16_FIELDS else quantize(
        rng.normal(size=(8, 256)).astype(np.float32), qtype)
    dense, weight = read_blocks(data, qtype)
    assert weight is None and torch.equal(dense, torch.tensor(dequantize(data, qtype)))


def test_the_f32_file_loads_exactly_the_checkpoint_it_was_converted_from(files):
    source, paths = files
    f32, reference = paths["f32"]
    config, original = read_gguf(f32).config, json.loads((source / "config.json").read_text())
    same = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "max_position_embeddings",
            "tie_word_embeddings", "bos_token_id", "eos_token_id")
    assert {key: config[key] for key in same} == {key: original[key] for key in same}
    assert config["rope_theta"] == original["rope_parameters"]["rope_theta"]
    assert config["rms_norm_eps"] == pytest.approx(original["rms_norm_eps"])  # stored as float32
    with safe_open(source / "model.safetensors", "pt") as a, safe_open(reference / "model.safetensors", "pt") as b:
        assert all(torch.equal(a.get_tensor(name), b.get_tensor(name)) for name in a.keys())
    ours, theirs = load_model(f32, "float32")[0], load_model(source, "float32")[0]
    for (name, x), (_, y) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("kind", ["f32", "q8_0", "q4_k_m"])
def test_float32_logits_equal_transformers_on_the_weights_the_gguf_library_reads(files, kind):
    source, paths = files
    path, reference = paths[kind]
    model = check_batched_prompt_logits(path, reference=reference, tokenizer=str(source)).engine.model
    linears = {name for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    packed = [isinstance(moe.experts, QuantGroupedExperts) for _, moe in moe_blocks(model)]
    if kind == "f32":
        assert not linears and not any(packed)
    elif kind == "q8_0":  # q/k/v, o and the head, and every expert
        assert len(linears) == 2 * len(model.layers) + 1 and all(packed)
        assert all(m.bits == 8 for m in model.modules() if isinstance(m, QuantLinear))
    else:  # everything packed: layer 1's q/k/v (Q4_K q and k, Q6_K v) widened to 8 bits in groups of 16
        assert len(linears) == 2 * len(model.layers) + 1 and all(packed)
        qkv = {name: m for name, m in model.named_modules() if name.endswith("qkv_proj")}
        assert [(m.bits, m.in_features // m.scales.shape[-1]) for m in qkv.values()] == [(4, 32), (8, 16)]
        experts = [moe.experts for _, moe in moe_blocks(model)]
        assert experts[0].bits == {"w13": 4, "w2": 4} and experts[1].bits == {"w13": 4, "w2": 8}


@pytest.mark.avx512_bf16
@pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="needs a CPU with AVX512-BF16")
def test_q4_k_on_the_kernels_meets_the_bf16_bar(files):
    """Every layer on the quantized kernels, layer 1's mixed Q4_K/Q6_K experts and widened q/k/v included."""
    source, paths = files
    path, reference = paths["q4_k_m"]
    check_quantized_kernels(path, reference, tokenizer=str(source))


@pytest.mark.parametrize("kind,target,dtype", [("q8_0", "disk", "float32"), ("q4_k_m", "host", "float32"),
                                               ("q4_k_m", "disk", "bfloat16")])
def test_offloaded_experts_are_the_files_blocks(files, kind, target, dtype):
    """The store reads each expert's blocks from the file (layer 1's Q4_K w13 beside Q6_K w2 included)."""
    if dtype == "bfloat16" and not cpu_has_avx512_bf16():
        pytest.skip("needs a CPU with AVX512-BF16")
    source, paths = files
    check_offloaded_like_resident(paths[kind][0], target, dtype, tokenizer=str(source))


def test_offloading_refuses_experts_that_come_dense(files):
    source, paths = files
    with pytest.raises(ValueError, match="offloading of a gguf checkpoint.*GGUF types other than"):
        engine(paths["f32"][0], tokenizer=str(source), expert_cache_size=1)


def test_experts_stored_one_tensor_each_load_like_stacked_ones(files, tmp_path):
    """Files converted before 2024 hold blk.N.ffn_gate.E.weight for each expert E."""
    f32 = files[1]["f32"][0]

    def split(tensor: ReaderTensor) -> Stored:
        if "_exps." not in tensor.name:
            return keep(tensor)
        return [(tensor.name.replace("_exps.", f".{e}."), data, tensor.tensor_type)
                for e, data in enumerate(tensor.data)]
    per_expert = rewrite(f32, tmp_path / "per-expert.gguf", split)
    ours, theirs = load_model(per_expert, "float32")[0], load_model(f32, "float32")[0]
    for (name, x), (_, y) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.equal(x, y), name


def test_a_file_without_an_output_tensor_ties_the_head_to_the_embedding(files, tmp_path):
    f32 = files[1]["f32"][0]
    tied = rewrite(f32, tmp_path / "tied.gguf", lambda t: [] if t.name == "output.weight" else keep(t))
    model, config = load_model(tied, "float32")
    assert config["tie_word_embeddings"] and model.lm_head.weight is model.embed_tokens.weight


def test_what_cannot_be_served_is_refused(files, tmp_path):
    source, paths = files
    f32 = paths["f32"][0]
    with pytest.raises(ConfigError, match="a GGUF file needs --tokenizer"):
        engine(f32)
    for path, refusal in [
        (rewrite(f32, tmp_path / "dense.gguf", drop="llama.expert_count"), "'llama' without experts"),
        (rewrite(f32, tmp_path / "qwen.gguf", arch="qwen2moe"), "'qwen2moe'"),
        (rewrite(f32, tmp_path / "f64.gguf", lambda t: [(t.name, t.data.astype(np.float64), F64)]), "F64"),
        (rewrite(f32, tmp_path / "rope.gguf", lambda t: keep(t) + (
            [("rope_freqs.weight", np.ones(8, np.float32), F32)] if t.name == "output_norm.weight" else [])),
         "'rope_freqs.weight'"),
    ]:
        with pytest.raises(ValueError, match=refusal):
            engine(path, tokenizer=str(source))
    # vLLM's --quantization gguf names the file's own quantization: taken for a GGUF, refused for anything else
    assert engine(f32, tokenizer=str(source), quantization="gguf").engine.model.quantized_checkpoint is not None
    for model, asked in ((f32, "int8"), (source, "gguf")):
        with pytest.raises(ValueError, match=f"quantization '{asked}'"):
            engine(model, tokenizer=str(source), quantization=asked)


@pytest.mark.parametrize("kind", ["q8_0", "q4_k_m"])
def test_the_plan_counts_the_bytes_serving_holds(files, kind):
    """`localmoe plan file.gguf` counts each tensor as the loader holds it (layer 1's widened q/k/v and its Q6_K
    down projections included): the plan's bytes are the served model's own."""
    source, paths = files
    plan = json.loads(plan_command(str(paths[kind][0]), dtype="bf16", device="cpu:1", json_output=True))
    runner = engine(paths[kind][0], tokenizer=str(source), dtype="bfloat16", enforce_eager=True).engine.runner
    experts, vocab = runner.hf_config["num_local_experts"], runner.hf_config["vocab_size"]
    held = dict(runner.model.named_parameters()) | dict(runner.model.named_buffers())

    def padded(name: str, dim: int, rows: int) -> int:
        return (held[name].shape[dim] - rows) * held[name].nbytes // held[name].shape[dim]
    # serving pads the routers' and the head's rows to a multiple of 16 for the kernels; the plan counts none
    padding = sum(padded(name, 0, experts) for name in held if name.endswith("mlp.gate.weight")) + sum(
        padded(f"lm_head.{part}", dim, vocab) for part, dim in (("q", 0), ("scales", -1), ("zeros", -1)))
    assert plan["quantization"] == "gguf" and plan["weight_bytes"] == runner.weight_bytes() - padding
    with pytest.raises(PlanError, match="served in its own quantization"):
        plan_command(str(paths[kind][0]), quantization="int4")

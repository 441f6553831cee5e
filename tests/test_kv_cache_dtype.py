"""--kv-cache-dtype fp8: the KV pool holds e4m3 rows, each with the exponent of its power-of-two scale
(layers/kv_cache_dtype.py), written and read alike by the CPU kernel, the PyTorch paths and MLA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from family_parity import engine, prompts_of, record_logits
from test_deepseek import checkpoint as deepseek_checkpoint
from localmoe import SamplingParams
from localmoe.config import ConfigError, load_config
from localmoe.layers import attention
from localmoe.layers.attention import AttentionMetadata, paged_attention
from localmoe.layers.cpu_kernels import cpu_has_avx512_bf16, kernels
from localmoe.layers.kv_cache_dtype import FP8, decode, encode
from localmoe.models.builtin import SHIPPED_DIR

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def needs_kernels(test):
    """Marked as test_cpu_kernels.py's are: skipped (also under CI) where the CPU lacks AVX512-BF16."""
    return pytest.mark.avx512_bf16(pytest.mark.skipif(not cpu_has_avx512_bf16(),
                                                      reason="needs a CPU with AVX512-BF16")(test))


@pytest.mark.parametrize("value", ["fp8_e5m2", "int8", "float16"])
def test_a_kv_cache_dtype_we_do_not_serve_is_refused_by_name(value):
    with pytest.raises(ConfigError, match=f"kv_cache_dtype '{value}'"):
        load_config(None, {"engine": {"kv_cache_dtype": value}})


@pytest.mark.parametrize("value", ["auto", "fp8", "fp8_e4m3"])
def test_vllm_names_of_the_kv_cache_dtype_are_taken(value):
    assert load_config(None, {"engine": {"kv_cache_dtype": value}}).engine.kv_cache_dtype == value


def test_rows_keep_each_number_to_e4m3_precision_under_a_power_of_two_scale():
    """Rows of every magnitude: the exponent puts each row's largest |x| in [128, 256], a number comes back exactly
    as code * 2^e, within half an e4m3 step of x (2^-4 |x|, or 2^(e-10) among subnormals)."""
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * torch.logspace(-12, 12, 64, base=2)[:, None]
    rows = encode(x, FP8)
    assert rows.shape == (64, 33) and rows.dtype == FP8
    exponent = rows[:, -1:].view(torch.int8).long()
    assert torch.equal(exponent, torch.floor(torch.log2(x.abs().amax(1, keepdim=True))).long() - 7)
    codes = rows[:, :-1].float()
    largest = codes.abs().amax(1)
    assert ((largest >= 128) & (largest <= 256)).all()  # [128, 256) before rounding
    back = decode(rows, torch.float32)
    scale = torch.pow(2.0, exponent.double())
    assert torch.equal(back.double(), codes.double() * scale)
    assert ((back - x).abs() <= torch.maximum(2**-4 * x.abs(), scale.float() * 2**-10)).all()
    # a zero row; a row past 2^72, whose exponent stops at 64 and whose largest number saturates at 448 * 2^64
    extremes = decode(encode(torch.tensor([[0.0, 0.0], [2.0**80, 1.0]]), FP8), torch.float32)
    assert extremes.tolist() == [[0.0, 0.0], [448 * 2.0**64, 0.0]]


def rounding_cases() -> torch.Tensor:
    """[rows, 16]: every e4m3 number below 256, the ties halfway between neighbours and a float32 step either side
    of each, both signs; each row led by 255 (exponent 0), then the lot again scaled down and up to the ends of
    the exponent's range (the clamped ones shift numbers into the subnormals or saturate them)."""
    numbers = torch.arange(0, 0x78, dtype=torch.uint8).view(FP8).float()
    ties = (numbers[1:] + numbers[:-1]) / 2
    nudged = [torch.nextafter(ties, torch.full_like(ties, bound)) for bound in (0.0, 1e9)]
    values = torch.cat([numbers, ties, *nudged])
    values = torch.cat([values, -values, torch.tensor([-0.0, -1e-5])])
    values = F.pad(values, (0, -len(values) % 15)).view(-1, 15)
    rows = torch.cat([torch.full((len(values), 1), 255.0), values], dim=1)
    return torch.cat([rows * 2.0**shift for shift in (-70, -20, 0, 30, 75)])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_stores_and_reads_fp8_rows_exactly_like_pytorch(dtype):
    """Each row alone in its block, as key and value (the value negated): the kernel's codes and exponents equal
    PyTorch's bit for bit (round to nearest even, subnormals, signed zeros, saturation), and with the row its only
    key the output is the value as PyTorch reads it back, exactly."""
    k = rounding_cases().to(dtype)[:, None, :]  # [B, 1 kv head, 16]
    v = -k
    batch = k.shape[0]
    cache = torch.zeros(2, batch, 1, 1, 17, dtype=FP8)  # blocks of one token
    out = kernels().paged_attention(torch.zeros_like(k), k, v, cache, torch.arange(batch)[:, None],
                                    torch.ones(batch, dtype=torch.long), 1.0, 0, None)
    assert torch.equal(as_bytes(cache[0, :, 0, 0]), as_bytes(encode(k[:, 0], FP8)))
    assert torch.equal(as_bytes(cache[1, :, 0, 0]), as_bytes(encode(v[:, 0], FP8)))
    assert out.dtype == dtype and torch.equal(out, decode(cache[1, :, :, 0], dtype))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,with_sinks", [(None, False), (3, True)])
def test_a_mixed_step_over_an_fp8_cache_runs_the_kernel_like_the_pytorch_path(monkeypatch, dtype, window,
                                                                                with_sinks):
    """Decodes and prompt chunks over scattered fp8 blocks (head dim 32: rows of 33 bytes), grouped query heads:
    the kernel writes the same bytes as the PyTorch path and attends to the same numbers."""
    g = torch.Generator().manual_seed(5)
    meta = AttentionMetadata.build([1, 4, 2], [9, 6, 2], [[3, 0, 7], [5, 1], [2]], 4, torch.device("cpu"))
    cache = encode(torch.randn(2, 8, 2, 4, 32, generator=g) * 4, FP8)
    q, k, v = (torch.randn(7, heads, 32, generator=g).to(dtype) for heads in (4, 2, 2))
    sinks = torch.randn(4, generator=g) if with_sinks else None
    reference_cache = cache.clone()
    assert attention._kernel_takes(q, cache)
    ours = paged_attention(q, k, v, cache, meta, 0.2, window, sinks)
    monkeypatch.setattr(attention, "_kernel_takes", lambda q, kv_cache: False)
    expected = paged_attention(q, k, v, reference_cache, meta, 0.2, window, sinks)
    assert torch.equal(as_bytes(cache), as_bytes(reference_cache))
    assert ours.dtype == expected.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2**-6  # bf16: two steps of its 8-bit significand
    assert torch.allclose(ours.float(), expected.float(), rtol=tolerance, atol=tolerance)


def test_an_fp8_pool_holds_e4m3_rows_and_about_twice_the_blocks_of_bf16(tiny_mixtral_dir):
    """Same kv_cache_memory: a block of fp8 rows takes (D + 1) / 2D of a bf16 block (head dim 16 here: 17/32, from
    D = 128 on 129/256), and /v1/stats/memory says so."""
    memory = 2**22
    pools = {kv: engine(tiny_mixtral_dir, dtype="bfloat16", kv_cache_dtype=kv, kv_cache_memory=memory,
                        swap_space=2**-10).engine for kv in ("auto", "fp8")}
    layers, kv_heads, block_size, head_dim = 3, 2, 4, 16
    for kv, row_bytes, name in (("auto", 2 * head_dim, "bfloat16"), ("fp8", head_dim + 1, "fp8_e4m3")):
        block_bytes = layers * 2 * kv_heads * block_size * row_bytes
        stats = pools[kv].snapshot.memory["kv_cache"]
        assert stats["num_blocks"] == pools[kv].block_manager.num_blocks == memory // block_bytes
        assert stats["bytes"] == stats["num_blocks"] * block_bytes and stats["dtype"] == name
        assert stats["swap_bytes"] == 2**20 // block_bytes * block_bytes
    fp8 = pools["fp8"].runner
    assert {c.dtype for c in fp8.kv_caches + fp8.swap_caches} == {FP8}
    assert fp8.kv_caches[0].shape[2:] == (kv_heads, block_size, head_dim + 1)
    ratio = pools["fp8"].block_manager.num_blocks / pools["auto"].block_manager.num_blocks
    assert ratio == pytest.approx(2 * head_dim / (head_dim + 1), rel=1e-3)


def generate_over_fp8(directory) -> tuple[list[list[int]], list[torch.Tensor], torch.Tensor]:
    """Greedy tokens of three prompts (float32 model, fp8 cache), every step's logits, the first layer's cache."""
    llm = engine(directory, kv_cache_dtype="fp8", enable_prefix_caching=False)
    steps = record_logits(llm)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts_of([5, 17, 11], seed=4)], GREEDY)
    return [o.outputs[0].token_ids for o in outs], steps, llm.engine.runner.kv_caches[0]


@needs_kernels
def test_the_kernel_serves_an_fp8_cache_like_the_pytorch_path(tiny_mixtral_dir, monkeypatch):
    """With our attention kernel and then with the PyTorch path: the same greedy tokens, every step's logits within
    1e-4, and the first layer's cache (keys and values no attention output has touched yet) the same bytes."""
    tokens, steps, cache = generate_over_fp8(tiny_mixtral_dir)
    monkeypatch.setattr(attention, "_kernel_takes", lambda q, kv_cache: False)
    their_tokens, their_steps, their_cache = generate_over_fp8(tiny_mixtral_dir)
    assert tokens == their_tokens
    assert max((a - b).abs().max().item() for a, b in zip(steps, their_steps)) <= 1e-4
    assert torch.equal(as_bytes(cache), as_bytes(their_cache))


def heldout_logits(kv_cache_dtype: str, windows: int = 4, length: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained built-in model in bf16 over held-out text: logits at every position of a few windows, [n, V],
    and the token each position predicts, [n]."""
    llm = engine(SHIPPED_DIR, dtype="bfloat16", kv_cache_dtype=kv_cache_dtype)
    ids = llm.get_tokenizer().encode((SHIPPED_DIR / "heldout_sample.txt").read_text()[:20000],
                                     add_special_tokens=False)
    chunks = [ids[i * length:(i + 1) * length] for i in range(windows)]
    steps = record_logits(llm)
    llm.generate([{"prompt_token_ids": c} for c in chunks], SamplingParams(max_tokens=1, prompt_logprobs=0))
    logits = torch.cat([s.float() for s in steps[:-1]])  # the prompt rows; the last step samples
    assert logits.shape[0] == windows * length
    targets = torch.tensor([t for c in chunks for t in c[1:] + [-100]])  # no target after a window's last token
    return logits, targets


def test_fp8_moves_the_logits_of_a_trained_model_a_little_and_its_perplexity_less_than_one_percent():
    """Against the bf16 cache, teacher-forced on held-out text (both with the model in bf16). e4m3 keeps 3 mantissa
    bits, bf16 7: the logits move by a median ~0.03 (about 4x what running the whole model in bf16 rather than
    float32 moves them), enough to flip the argmax where the top two nearly tie (~4% of positions of this 15M-
    parameter model) and so, sooner or later, a greedy continuation; what holds is the model's quality, its
    perplexity within 1% (0.1% on the whole held-out sample: `python -m localmoe.train.evaluate`)."""
    (fp8, targets), (bf16, _) = heldout_logits("fp8"), heldout_logits("auto")
    moved = (fp8 - bf16).abs()
    assert 1e-3 < moved.median() < 0.1
    assert (fp8.argmax(-1) == bf16.argmax(-1)).float().mean() > 0.9
    nll = [F.cross_entropy(logits, targets, ignore_index=-100).item() for logits in (fp8, bf16)]
    assert math.exp(nll[0]) == pytest.approx(math.exp(nll[1]), rel=0.01)


def test_swapped_out_fp8_blocks_come_back_unchanged(tiny_mixtral_dir):
    """Preemption by swapping copies fp8 rows with their exponents to host and back: the outputs equal those of a
    pool large enough never to preempt."""
    block_bytes = 3 * 2 * 2 * 4 * 17
    batch = [{"prompt_token_ids": p} for p in prompts_of([24, 30, 36], seed=1)]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    roomy = engine(tiny_mixtral_dir, kv_cache_dtype="fp8")
    swapping = engine(tiny_mixtral_dir, kv_cache_dtype="fp8", kv_cache_memory=24 * block_bytes, max_model_len=64,
                      swap_space=200 * block_bytes / 2**30)
    outs = [[o.outputs[0].token_ids for o in llm.generate(batch, params)] for llm in (swapping, roomy)]
    assert outs[0] == outs[1]
    assert swapping.engine.stats.num_swapped_out_total > 0


def test_mla_caches_fp8_latents_and_its_decode_steps_read_them_like_a_prefill(tmp_path):
    """DeepSeek's latent cache in fp8 ([1, N, S, C + 1]): the prompt's logits move from the float32 cache's (by 7% of
    their norm on these random weights), and each decode step (queries absorbed into latent space, over the cached
    entries) agrees within 1e-4 with one prefill of the same tokens (latents expanded into keys and values): both
    read the same stored entries."""
    directory = deepseek_checkpoint(tmp_path, "v3-lora-q-grouped-yarn", seed=5)
    prompt = prompts_of([13], seed=2)[0]
    reference = engine(directory, enable_prefix_caching=False)
    reference_steps = record_logits(reference)
    reference.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1))
    llm = engine(directory, kv_cache_dtype="fp8", enable_prefix_caching=False)
    cache, cfg = llm.engine.runner.kv_caches[0], llm.engine.hf_config
    assert cache.dtype == FP8 and cache.shape[-1] == cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] + 1
    steps = record_logits(llm)
    tokens = llm.generate({"prompt_token_ids": prompt}, GREEDY)[0].outputs[0].token_ids
    moved = (steps[0][0] - reference_steps[0][0]).norm() / reference_steps[0][0].norm()
    assert 1e-4 < moved < 0.15
    decoded = torch.cat(steps[1:])
    steps.clear()
    llm.generate({"prompt_token_ids": prompt + tokens}, SamplingParams(max_tokens=1, prompt_logprobs=0))
    prefilled = steps[0][len(prompt):-1]
    assert (decoded - prefilled).abs().max() <= 1e-4

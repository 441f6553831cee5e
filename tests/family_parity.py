"""The checks every served architecture passes against transformers' own implementation on the same random
weights (float32): last-token logits of batched prompts, 32 greedy tokens with a shared prefix (prefix caching
off and on) and every decode step's logits, and requests joining a running batch."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from checkpoints import reference_model
from localmoe import LLM, SamplingParams
from localmoe.experts.cpu import TiledExperts
from localmoe.experts.quantized import QuantGroupedExperts
from localmoe.layers.cpu_kernels import QuantTiles
from localmoe.layers.moe import SparseMoE, moe_blocks
from localmoe.layers.quant_linear import QuantLinear

TOL = 1e-4
# where the engines under test run: LOCALMOE_TEST_DEVICE=cuda runs the parity suite on a GPU (benchmarks/gpu_check.sh)
TEST_DEVICE = os.environ.get("LOCALMOE_TEST_DEVICE", "cpu")


def engine(directory: Path, **kwargs) -> LLM:
    settings = {"dtype": "float32", "kv_cache_memory": 8 * 2**20, "block_size": 4, "device": TEST_DEVICE, **kwargs}
    return LLM(model=str(directory), **settings)


def record_logits(llm: LLM) -> list[torch.Tensor]:
    """Capture every logits tensor the engine computes, one entry per engine step."""
    steps: list[torch.Tensor] = []
    model = llm.engine.model
    compute = model.compute_logits

    def recording(hidden):
        logits = compute(hidden)
        steps.append(logits.detach().clone())
        return logits

    model.compute_logits = recording
    return steps


def prompts_of(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 263, (n,), generator=g).tolist() for n in lengths]


def reference_logits(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0]


def reference_greedy(ref, prompt: list[int], new: int) -> list[int]:
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    return out[0, len(prompt):].tolist()


def check_batched_prompt_logits(directory: Path, lengths: list[int] = [5, 13, 22, 1], reference: Path | None = None,
                                **kwargs) -> LLM:
    """All prompts in one step; each one's last-token logits match the reference's (transformers on the weights
    in `reference`, by default the same checkpoint)."""
    ref = reference_model(reference or directory)
    llm = engine(directory, **kwargs)
    steps = record_logits(llm)
    prompts = prompts_of(lengths)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=1, temperature=0))
    assert len(steps) == 1 and steps[0].shape[0] == len(prompts)  # all prompts ran in one step
    for i, prompt in enumerate(prompts):
        expected = reference_logits(ref, prompt)[-1]
        assert (steps[0][i] - expected).abs().max().item() <= TOL
        assert outs[i].outputs[0].token_ids == [int(expected.argmax())]
    return llm


def check_greedy_with_shared_prefix(directory: Path, prefix_caching: bool, new: int = 32, reference: Path | None = None,
                                    **kwargs) -> None:
    """Four prompts sharing a 19-token prefix, the first alone then three batched: greedy tokens equal the
    reference's, the prefix cache is hit exactly when it is on, and every decode step's logits match."""
    ref = reference_model(reference or directory)
    llm = engine(directory, enable_prefix_caching=prefix_caching, **kwargs)
    steps = record_logits(llm)
    shared = prompts_of([19], seed=7)[0]
    prompts = [shared + tail for tail in prompts_of([3, 6, 1], seed=8)]
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    first = llm.generate({"prompt_token_ids": prompts[0]}, params)
    rest = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], params)
    assert (llm.engine.stats.prefix_cache_hits > 0) == prefix_caching
    for prompt, out in zip(prompts, first + rest):
        assert out.outputs[0].token_ids == reference_greedy(ref, prompt, new)
    out = first[0].outputs[0]
    full = reference_logits(ref, prompts[0] + out.token_ids)
    for step, logits in enumerate(steps[:new]):
        position = len(prompts[0]) - 1 + step
        assert (logits[0] - full[position]).abs().max().item() <= TOL


def check_requests_joining_mid_batch(directory: Path, new: int = 12) -> None:
    """Continuous batching: requests added while others decode still match the reference, and every KV block
    is free at the end."""
    ref = reference_model(directory)
    llm = engine(directory)
    core = llm.engine
    prompts = prompts_of([7, 30, 12], seed=11)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    done = {}
    for step in range(200):
        if step < len(prompts):
            core.add_request(str(step), None, prompts[step], params)
        for out in core.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        if not core.has_unfinished_requests() and step >= len(prompts):
            break
    for i, prompt in enumerate(prompts):
        assert done[str(i)] == reference_greedy(ref, prompt, new)
    assert core.block_manager.usage == 0


def check_feature_matters(directory: Path, switch_off: Callable[[nn.Module], None]) -> None:
    """The checks above exercise a feature: switching it off in our loaded model (same weights) moves the
    last-token logits of a 22-token prompt."""
    llm = engine(directory, enable_prefix_caching=False)
    steps = record_logits(llm)
    prompt, params = {"prompt_token_ids": prompts_of([22])[0]}, SamplingParams(max_tokens=1, temperature=0)
    llm.generate(prompt, params)
    switch_off(llm.engine.model)
    llm.generate(prompt, params)
    assert (steps[0][0] - steps[1][0]).abs().max() > 1e-2


# Switches for check_feature_matters: each turns one option of our model off in place.
def moe_layers(model: nn.Module) -> list[SparseMoE]:
    return [m for m in model.modules() if isinstance(m, SparseMoE)]


def no_renormalization(model: nn.Module) -> None:
    for moe in moe_layers(model):
        moe.renormalize = False


def no_qk_norm(model: nn.Module) -> None:
    for layer in model.layers:
        layer.self_attn.q_norm = layer.self_attn.k_norm = None


def no_attention_bias(model: nn.Module) -> None:
    for layer in model.layers:
        layer.self_attn.qkv_proj.bias = layer.self_attn.o_proj.bias = None


def check_bfloat16_bar(directory: Path, lengths: list[int], new: int, reference: Path | None = None,
                       **kwargs) -> LLM:
    """The bar for reduced precision: run in bf16, our logits may differ from transformers' fp32 ones by at most
    twice what transformers' own bf16 run differs by, at every prefill and decode position of the batched
    requests. The maximum is set by the rare token whose router nearly ties and flips an expert in a bf16 run;
    the median shows the everyday rounding, so both are held to the bar."""
    ref32 = reference_model(reference or directory)
    ref16 = reference_model(reference or directory).to(torch.bfloat16)
    llm = engine(directory, dtype="bfloat16", **kwargs)
    steps = record_logits(llm)
    prompts = prompts_of(lengths, seed=12)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
    assert len(steps) == new and all(len(s) == len(prompts) for s in steps)
    ours, theirs = [], []
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        tokens = prompt + out.outputs[0].token_ids
        expected = reference_logits(ref32, tokens)[len(prompt) - 1:-1]
        ours.append((torch.stack([step[i] for step in steps]).float() - expected).abs())
        theirs.append((reference_logits(ref16, tokens)[len(prompt) - 1:-1].float() - expected).abs())
    ours, theirs = torch.cat(ours), torch.cat(theirs)
    print(f"bf16 abs diff from fp32 max / median: ours {ours.max():.3f} / {ours.median():.4f}, "
          f"transformers {theirs.max():.3f} / {theirs.median():.4f}")
    assert 0 < theirs.max() and ours.max() <= 2 * theirs.max()
    assert ours.median() <= 2 * theirs.median()
    return llm


def check_quantized_kernels(directory: Path, reference: Path, **kwargs) -> LLM:
    """check_bfloat16_bar for a quantized model (its checkpoint's or quantized at load), which must run on the
    quantized CPU kernels throughout: every MoE layer's experts as QuantTiles, every QuantLinear on the kernel."""
    llm = check_bfloat16_bar(directory, [7, 30, 18, 2, 11], new=16, reference=reference, **kwargs)
    model = llm.engine.model
    assert all(isinstance(moe.experts, TiledExperts) and isinstance(moe.experts.w13, QuantTiles)
               for _, moe in moe_blocks(model))
    assert all(m.kernel for m in model.modules() if isinstance(m, QuantLinear))
    return llm


def check_offloaded_like_resident(directory: Path, target: str, dtype: str, **kwargs) -> None:
    """A quantized checkpoint's experts offloaded with one slot for top-2 (every step runs in waves) are its own
    packed numbers: greedy tokens and every step's logits are the resident quantized serving's bit for bit, on the
    quantized kernel (bf16) or the quantized reference path (float32), and every miss moves one packed expert (its
    bytes as the resident experts hold it, less than bf16's)."""
    runs = []
    for offload in ({}, {"expert_cache_size": 1, "expert_offload_target": target}):
        llm = engine(directory, dtype=dtype, **offload, **kwargs)
        steps = record_logits(llm)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts_of([9, 17, 4, 12], seed=3)],
                            SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        runs.append(([o.outputs[0].token_ids for o in outs], torch.cat(steps), llm.engine))
    (tokens, logits, resident), (offloaded_tokens, offloaded_logits, core) = runs
    assert offloaded_tokens == tokens and torch.equal(offloaded_logits, logits)
    kind = TiledExperts if dtype == "bfloat16" else QuantGroupedExperts
    assert all(isinstance(moe.experts, kind) for _, moe in moe_blocks(resident.model))
    assert all(isinstance(moe.experts.compute, kind) for _, moe in moe_blocks(core.model))
    for (_, moe), cache in zip(moe_blocks(resident.model), core.experts.caches):
        expert_bytes = sum(t[0].numel() * t.element_size() for t in moe.experts.buffers())  # buffers stack them all
        shapes = core.experts.store.layers[cache.path].shapes  # one expert's w13 [2I, D] and w2 [D, I]
        assert expert_bytes < 2 * sum(math.prod(shape) for shape in shapes.values())  # bf16's
        assert cache.expert_bytes == expert_bytes and int(cache.stats.misses.sum()) > 0
        assert cache.stats.bytes_loaded == int(cache.stats.misses.sum()) * expert_bytes
    if target == "disk":
        assert core.experts.store.host_bytes() == 0

"""LocalMoE's own architecture and its routings: topk_softmax is Mixtral exactly, each other mechanism keeps its
defining property (expert choice balances experts, hash routing follows the token id, soft MoE mixes convexly,
a capacity factor drops tokens), the token-mixing ones never look across requests, and each is reachable from
the config's `model:` section and changes what the model says."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from family_parity import engine, prompts_of, record_logits
from localmoe import LLM, SamplingParams
from localmoe.config import ConfigError, load_config
from localmoe.experts.observer import RoutingObserver
from localmoe.layers.routing import drop_over_capacity, expert_choice, hash_topk, soft_moe_weights
from localmoe.layers.segments import Segments
from localmoe.models.loader import load_model
from localmoe.models.localmoe import LocalMoEBlock

NUM_EXPERTS, TOP_K, HIDDEN = 4, 2, 64  # tiny_mixtral_dir's shape


def segments_of(lengths: list[int]) -> Segments:
    return Segments.of(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))


def localmoe_checkpoint(mixtral_dir: Path, directory: Path, routing: str, seed: int = 0, **options) -> Path:
    """The tiny Mixtral's weights as a LocalMoE checkpoint: hash routing drops the gates, soft MoE puts a random
    Phi in their place."""
    directory.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(mixtral_dir / name, directory / name)
    config = json.loads((mixtral_dir / "config.json").read_text())
    config.update(architectures=["LocalMoEForCausalLM"], model_type="localmoe", routing=routing, **options)
    (directory / "config.json").write_text(json.dumps(config))
    weights = load_file(mixtral_dir / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    slots = NUM_EXPERTS * options.get("slots_per_expert", 1)
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.block_sparse_moe."
        if routing in ("hash", "soft_moe"):
            del weights[prefix + "gate.weight"]
        if routing == "soft_moe":
            weights[prefix + "phi"] = 0.3 * torch.randn(HIDDEN, slots, generator=g)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def checkpoints(tiny_mixtral_dir, tmp_path_factory):
    """Variant -> LocalMoE checkpoint directory (the same experts in each; "capacity": topk_softmax, factor 0.5)."""
    root = tmp_path_factory.mktemp("localmoe")
    variants = {"topk_softmax": ("topk_softmax", {}), "expert_choice": ("expert_choice", {}),
                "soft_moe": ("soft_moe", {"slots_per_expert": 2}), "hash": ("hash", {}),
                "capacity": ("topk_softmax", {"capacity_factor": 0.5})}
    return {name: localmoe_checkpoint(tiny_mixtral_dir, root / name, routing, **options)
            for name, (routing, options) in variants.items()}


def test_topk_softmax_is_exactly_mixtral(tiny_mixtral_dir, checkpoints):
    prompts = [{"prompt_token_ids": p} for p in prompts_of([5, 13, 22, 1])]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    runs = []
    for directory in (tiny_mixtral_dir, checkpoints["topk_softmax"]):
        llm = engine(directory)
        steps = record_logits(llm)
        runs.append(([o.outputs[0].token_ids for o in llm.generate(prompts, params)], steps))
    assert type(llm.engine.model).__name__ == "LocalMoEForCausalLM"
    (mixtral_tokens, mixtral_steps), (ours_tokens, ours_steps) = runs
    assert ours_tokens == mixtral_tokens
    assert len(ours_steps) == len(mixtral_steps) == 8
    assert all(torch.equal(a, b) for a, b in zip(ours_steps, mixtral_steps))


def test_expert_choice_gives_every_expert_the_same_tokens_per_sequence(checkpoints):
    lengths = [7, 3, 12, 1]
    segments = segments_of(lengths)
    logits = torch.randn(sum(lengths), NUM_EXPERTS, generator=torch.Generator().manual_seed(0))
    weights, ids = expert_choice(logits, segments, TOP_K)
    scores = torch.softmax(logits, dim=-1)
    start = 0
    for n in lengths:
        capacity = min(math.ceil(n * TOP_K / NUM_EXPERTS), n)
        rows = slice(start, start + n)
        for e in range(NUM_EXPERTS):
            picked = (ids[rows] == e).any(dim=1).nonzero().flatten()
            assert set(picked.tolist()) == set(scores[rows, e].topk(capacity).indices.tolist())  # its best tokens
        start += n
    assert torch.equal(weights, scores.gather(1, ids.clamp(min=0)) * (ids >= 0))
    per_token = (ids >= 0).sum(dim=1)
    assert per_token.min() < TOP_K < per_token.max()  # tokens get different numbers of experts

    # through the engine: one prompt, one step, and the statistics see each expert take ceil(21 * 2 / 4) tokens
    llm = engine(checkpoints["expert_choice"])
    llm.generate({"prompt_token_ids": prompts_of([21])[0]}, SamplingParams(max_tokens=1))
    assert llm.engine.observer.tokens.tolist() == [[11] * NUM_EXPERTS] * len(llm.engine.model.layers)


def test_hash_routing_follows_the_token_id(checkpoints):
    token_ids = torch.arange(263)
    weights, ids = hash_topk(token_ids, 8, 2)
    assert torch.equal(hash_topk(token_ids.flip(0), 8, 2)[1], ids.flip(0))  # per token id, wherever it stands
    assert (ids[:, 0] != ids[:, 1]).all() and (weights == 0.5).all()
    counts = torch.bincount(ids[:, 0], minlength=8)
    assert (counts > 0).sum() >= 4 and counts.max() < 263 / 4  # varied tokens spread over the experts

    llm = engine(checkpoints["hash"])
    prompt = prompts_of([40])[0]
    llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1))
    counts = llm.engine.observer.tokens.tolist()
    expected = torch.bincount(hash_topk(torch.tensor(prompt), NUM_EXPERTS, TOP_K)[1].flatten(), minlength=NUM_EXPERTS)
    assert all(c == expected.tolist() for c in counts)  # every layer routes by the token alone
    assert sum(c > 0 for c in counts[0]) >= NUM_EXPERTS // 2


def test_soft_moe_mixes_tokens_into_slots_convexly():
    lengths = [5, 1, 9]
    segments = segments_of(lengths)
    dispatch, combine = soft_moe_weights(torch.randn(sum(lengths), 6) * 3, segments)
    assert dispatch.shape == (3, 6, 9) and (dispatch >= 0).all() and (combine >= 0).all()
    assert torch.allclose(dispatch.sum(dim=2), torch.ones(3, 6))  # each slot a convex mix of tokens...
    for b, n in enumerate(lengths):
        assert (dispatch[b, :, n:] == 0).all()  # ...of its own sequence's tokens only
    assert torch.allclose(combine.sum(dim=1), torch.ones(sum(lengths)))  # each token a convex mix of slots


def expert_ffn(block: LocalMoEBlock, e: int, x: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ block.experts.w13[e].T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ block.experts.w2[e].T


def test_soft_moe_block_is_the_papers_formula_per_sequence(checkpoints):
    model, _ = load_model(checkpoints["soft_moe"], "float32")
    block = model.layers[0].mlp
    observer = RoutingObserver(model)
    lengths = [6, 2]
    x = torch.randn(sum(lengths), HIDDEN, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = block(x, torch.zeros(sum(lengths), dtype=torch.long), segments_of(lengths))
        start = 0
        for n in lengths:
            xs = x[start:start + n]
            logits = xs @ block.phi  # [n, E * S]
            slots_in = torch.softmax(logits, dim=0).T @ xs
            slots_out = torch.stack([expert_ffn(block, i // 2, s) for i, s in enumerate(slots_in)])
            assert torch.allclose(out[start:start + n], torch.softmax(logits, dim=1) @ slots_out, atol=1e-5)
            start += n
    observer.end_step()
    assert observer.tokens[0].tolist() == [2 * 2] * NUM_EXPERTS  # slots run: 2 sequences x 2 slots


def test_capacity_factor_drops_tokens_past_capacity():
    # one expert per token, capacity ceil(6 * 1 / 4) = 2 per expert in the first sequence, 1 in the second
    ids = torch.tensor([[0], [0], [0], [1], [0], [2], [0], [0]])
    weights, kept = drop_over_capacity(torch.ones(8, 1), ids, segments_of([6, 2]), NUM_EXPERTS, 1.0)
    assert kept.flatten().tolist() == [0, 0, -1, 1, -1, 2, 0, -1]  # first come first served, per sequence
    assert torch.equal(weights, (kept >= 0).float())


def test_a_token_every_expert_dropped_passes_through_on_the_residual(checkpoints):
    model, _ = load_model(checkpoints["capacity"], "float32")
    block = model.layers[0].mlp
    observer = RoutingObserver(model)
    x = torch.randn(16, HIDDEN, generator=torch.Generator().manual_seed(4))
    segments = segments_of([16])
    with torch.no_grad():
        out = block(x, torch.zeros(16, dtype=torch.long), segments)
        observer.end_step()
        _, ids = block.route(x)
    _, kept = drop_over_capacity(torch.ones(16, TOP_K), ids, segments, NUM_EXPERTS, 0.5)
    capacity = math.ceil(0.5 * 16 * TOP_K / NUM_EXPERTS)
    routed = torch.bincount(ids.flatten(), minlength=NUM_EXPERTS)
    assert observer.tokens[0].tolist() == routed.clamp(max=capacity).tolist()  # the kept pairs are counted
    dropped = (kept < 0).all(dim=1)
    assert 0 < dropped.sum() < 16
    assert (out[dropped] == 0).all() and (out[~dropped] != 0).any(dim=1).all()  # so h + mlp(h) == h for those


@pytest.mark.parametrize("routing", ["expert_choice", "soft_moe", "capacity"])
def test_a_request_does_not_depend_on_its_batch(checkpoints, routing):
    """Run one request alone, then batched with requests of other lengths (every prompt in one step): its tokens
    and logprobs (prompt and generated) stay; routing the batch as one sequence would have changed them."""
    llm = engine(checkpoints[routing], enable_prefix_caching=False)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0, prompt_logprobs=0)
    target, *others = prompts_of([9, 17, 4, 12], seed=5)

    def logprobs(out) -> list[float]:
        prompt = [entry[t].logprob for t, entry in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])]
        return prompt + [entry[t].logprob for t, entry in zip(out.outputs[0].token_ids, out.outputs[0].logprobs)]

    alone = llm.generate({"prompt_token_ids": target}, params)[0]
    batched = llm.generate([{"prompt_token_ids": p} for p in [others[0], target, *others[1:]]], params)[1]
    assert batched.outputs[0].token_ids == alone.outputs[0].token_ids
    assert torch.allclose(torch.tensor(logprobs(batched)), torch.tensor(logprobs(alone)), atol=1e-5)

    block = llm.engine.model.layers[0].mlp
    x = torch.randn(9 + 17, HIDDEN, generator=torch.Generator().manual_seed(6))
    token_ids = torch.tensor(target + others[0])
    with torch.no_grad():
        own = block(x, token_ids, segments_of([9, 17]))[:9]
        mixed = block(x, token_ids, segments_of([26]))[:9]
    assert (own - mixed).abs().max() > 1e-3


MODEL_SECTION = """model:
  num_experts: 4
  top_k_experts: 2
  hidden_size: 64
  intermediate_size: 96
  num_layers: 2
  num_attention_heads: 4
  num_key_value_heads: 2
  max_sequence_length: 256
"""


def test_each_routing_is_live_end_to_end_from_the_config(tmp_path):
    """localmoe-random with `routing:` (and `capacity_factor:`) in the config file: each mechanism generates,
    its statistics count tokens, and each gives other logprobs than every other one on the same weights."""
    settings = {"topk_softmax": "", "expert_choice": "  routing: expert_choice\n",
                "soft_moe": "  routing: soft_moe\n", "hash": "  routing: hash\n",
                "capacity": "  capacity_factor: 0.5\n"}
    prompt = {"prompt_token_ids": prompts_of([24], seed=9)[0]}
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=0)
    logprobs = {}
    for name, extra in settings.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(MODEL_SECTION + extra)
        llm = LLM(model="localmoe-random", config=str(path), dtype="float32", kv_cache_memory=2**22)
        hf = llm.engine.hf_config
        assert hf["architectures"][0] == ("MixtralForCausalLM" if name == "topk_softmax" else "LocalMoEForCausalLM")
        out = llm.generate(prompt, params)[0]
        assert len(out.outputs[0].token_ids) == 4
        assert llm.engine.snapshot.experts["totals"]["tokens_routed"] > 0
        logprobs[name] = torch.tensor([e[t].logprob for t, e in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])])
    names = list(logprobs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert (logprobs[a] - logprobs[b]).abs().max() > 1e-3, (a, b)


def test_unusable_routing_settings_are_refused(tmp_path, checkpoints):
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  routing: top1\n")
    with pytest.raises(ConfigError, match="model.routing"):
        load_config(path)
    path.write_text("model:\n  routing: soft_moe\n  capacity_factor: 1.0\n")
    with pytest.raises(ConfigError, match="model.capacity_factor"):
        load_config(path)
    with pytest.raises(ValueError, match="expert_cache_size"):
        engine(checkpoints["expert_choice"], expert_cache_size=2)
    with pytest.raises(ValueError, match="routing_trace"):
        engine(checkpoints["soft_moe"], routing_trace=str(tmp_path / "trace.jsonl"))

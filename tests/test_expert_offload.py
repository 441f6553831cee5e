"""Expert offloading: an ExpertCache of a few slots per MoE layer, fed from host memory or straight from the
checkpoint files, gives the same logits and greedy tokens as the fully resident model, within its byte budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import make_checkpoint
from family_parity import engine, prompts_of, record_logits
from localmoe import SamplingParams
from localmoe.experts.cache import ExpertCache, SlotPool
from localmoe.experts.cpu import TiledExperts
from localmoe.experts.store import ExpertStore
from localmoe.layers.cpu_kernels import kernels
from localmoe.layers.moe import SparseMoE

NEW = 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Mixtral with 8 experts top-2: per-expert tensors, as the hub stores them."""
    return make_checkpoint(tmp_path_factory.mktemp("offload"), "mixtral", seed=21, num_local_experts=8)


@pytest.fixture(scope="module")
def fused_checkpoint(checkpoint, tmp_path_factory) -> Path:
    """The same weights with each layer's experts stacked into one gate_up_proj / down_proj tensor (the layout
    transformers keeps in memory), so a disk read takes one expert's rows out of a larger tensor."""
    directory = tmp_path_factory.mktemp("offload-fused")
    tensors = load_file(checkpoint / "model.safetensors")
    config = json.loads((checkpoint / "config.json").read_text())
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.block_sparse_moe.experts"
        experts = range(config["num_local_experts"])
        w1, w2, w3 = ([tensors.pop(f"{prefix}.{e}.{w}.weight") for e in experts] for w in ("w1", "w2", "w3"))
        tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat([torch.stack(w1), torch.stack(w3)], 1)
        tensors[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(w2)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((checkpoint / name).read_bytes())
    return directory


def run(directory: Path, **offload) -> tuple[list[list[int]], list[torch.Tensor], object]:
    """Greedy tokens of four batched prompts and every step's logits."""
    llm = engine(directory, **offload)
    steps = record_logits(llm)
    budgets = []
    hook = llm.engine.step

    def step():  # the cache's own accounting after every engine step
        out = hook()
        budgets.extend((c.resident_bytes, c.budget_bytes) for c in llm.engine.experts.caches)
        return out

    llm.engine.step = step
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts_of([9, 17, 4, 12], seed=3)],
                        SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True))
    assert all(held <= budget for held, budget in budgets)
    return [o.outputs[0].token_ids for o in outs], steps, llm.engine


@pytest.fixture(scope="module")
def resident(checkpoint):
    tokens, steps, _ = run(checkpoint)
    return tokens, steps


@pytest.mark.parametrize("target,size,policy,prefetch", [
    ("host", 1, "lru", False),  # a budget below top-k: every step runs in waves
    ("disk", 1, "lfu", False),
    ("disk", 3, "lfru", True),
    ("host", 4, "lru", True),
])
def test_offloaded_experts_give_the_resident_outputs(checkpoint, resident, target, size, policy, prefetch):
    tokens, steps, core = run(checkpoint, expert_cache_size=size, expert_offload_target=target,
                              expert_cache_policy=policy, expert_prefetch=prefetch)
    assert tokens == resident[0]
    for ours, theirs in zip(steps, resident[1]):
        assert (ours - theirs).abs().max() <= 1e-4
    caches = core.experts.caches
    assert len(caches) == 3 and all(c.capacity == size for c in caches)
    assert all(int(c.stats.misses.sum()) > 0 and c.stats.bytes_loaded > 0 for c in caches)
    # the model itself holds only the slots: no full copy of the experts on the compute device
    moe = next(m for m in core.model.modules() if isinstance(m, SparseMoE))
    compute = moe.experts.compute
    assert compute.w13.shape[0] == size and compute.w13.data_ptr() == caches[0].slots["w13"].data_ptr()
    if prefetch:
        assert sum(c.stats.prefetched for c in caches) > 0 and sum(c.stats.prefetch_used for c in caches) > 0
    if target == "disk":  # nothing in host memory: each miss read one expert's w13 and w2 from the expert file
        assert core.experts.store.host_bytes() == 0
        file = core.experts.store.file
        loads = sum(int(c.stats.misses.sum()) + c.stats.prefetched for c in caches)
        assert file.direct_reads + file.buffered_reads == 2 * loads
        for c in caches:
            assert c.stats.bytes_loaded == (int(c.stats.misses.sum()) + c.stats.prefetched) * c.expert_bytes


def test_disk_reads_one_experts_rows_of_a_stacked_tensor(fused_checkpoint, resident):
    tokens, _, core = run(fused_checkpoint, expert_cache_size=2, expert_offload_target="disk")
    assert tokens == resident[0]
    cache = core.experts.caches[0]
    assert cache.stats.bytes_loaded == int(cache.stats.misses.sum()) * cache.expert_bytes


@pytest.mark.parametrize("prompt_len,target", [(11, "disk"), (40, "host")])
def test_bfloat16_offloaded_matches_bfloat16_resident(checkpoint, prompt_len, target):
    """bf16, three slots for top-2 of 8 experts, so the prompt step runs in waves, and decode steps too, on our
    CPU kernel over the slots (the store lays each expert out in the kernel's tiles: host copies once, disk
    reads as they come): partial results are summed exactly and rounded once, so logits are bit for bit the
    resident model's."""
    prompt = {"prompt_token_ids": prompts_of([prompt_len], seed=4)[0]}
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    outputs = []
    for offload in ({}, {"expert_cache_size": 3, "expert_offload_target": target}):
        llm = engine(checkpoint, **{**offload, "dtype": "bfloat16"})
        steps = record_logits(llm)
        outputs.append((llm.generate(prompt, params)[0].outputs[0].token_ids, torch.cat(steps)))
    assert outputs[0][0] == outputs[1][0]
    assert torch.equal(outputs[0][1], outputs[1][1])
    caches = llm.engine.experts.caches
    assert all(int(c.stats.misses.sum()) > 3 for c in caches)  # experts were evicted and loaded again
    if kernels() is not None:
        assert all(isinstance(m.experts.compute, TiledExperts) for m in llm.engine.model.modules()
                   if isinstance(m, SparseMoE))


@pytest.mark.avx512_bf16
@pytest.mark.parametrize("quantization,target", [("int4", "disk"), ("int8", "host"), ("experts_int8", "disk"),
                                                 ("fp8", "host")])
def test_quantized_offloaded_experts_give_the_quantized_resident_outputs(checkpoint, quantization, target):
    """Offloaded experts kept quantized (the store, the expert file and the slots hold the kernel's 8- or 4-bit or
    float8 tiles): the logits are the resident quantized model's bit for bit, and a slot and a miss are that much
    smaller than bf16's."""
    if kernels() is None:
        pytest.skip("needs the CPU kernels")
    prompt = {"prompt_token_ids": prompts_of([11], seed=4)[0]}
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    outputs = []
    for offload in ({}, {"expert_cache_size": 3, "expert_offload_target": target}):
        llm = engine(checkpoint, dtype="bfloat16", quantization=quantization, **offload)
        steps = record_logits(llm)
        outputs.append((llm.generate(prompt, params)[0].outputs[0].token_ids, torch.cat(steps)))
    assert outputs[0][0] == outputs[1][0]
    assert torch.equal(outputs[0][1], outputs[1][1])
    caches = llm.engine.experts.caches
    assert all(int(c.stats.misses.sum()) > 3 for c in caches)
    bf16_bytes = (2 * 96 * 64 + 64 * 96) * 2  # one expert's w13 [2I, D] and w2 [D, I] in bf16
    bits = 4 if quantization == "int4" else 8
    assert caches[0].slots["w13_q"].dtype == torch.uint8
    assert caches[0].expert_bytes < bf16_bytes * bits / 16 * 1.25  # the integers, and scales per group
    assert all(c.stats.bytes_loaded == int(c.stats.misses.sum()) * c.expert_bytes for c in caches)


class FakeStore(ExpertStore):
    """A host store of 6 one-number experts, to watch what the policies evict."""

    def __init__(self) -> None:
        super().__init__("host", torch.float32, weight_map=lambda name, t: [])
        self.add_layer("moe", 6, {"w13": (1,), "w2": (1,)})
        for kind in ("w13", "w2"):
            self.layers["moe"].host[kind].copy_(torch.arange(6.0)[:, None])


def resident_after(policy: str, accesses: list[list[int]], capacity: int = 3) -> set[int]:
    cache = ExpertCache("moe", FakeStore(), capacity, policy, torch.device("cpu"))
    for experts in accesses:
        for slots in cache.waves(torch.tensor([experts])):
            used = slots[slots >= 0]
            # each slot holds the expert it is said to hold
            assert cache.slots["w13"][used, 0].tolist() == [cache.slot_expert[s] for s in used.tolist()]
    assert cache.resident_bytes <= cache.budget_bytes
    return set(cache.expert_slot)


def test_eviction_policies():
    # expert 0 used most, but long ago; 1 and 2 recently; then 3 arrives into a full cache of three
    history = [[0]] * 5 + [[1], [2]] * 4 + [[3]]
    assert resident_after("lru", history) == {1, 2, 3}  # 0 is the least recent
    assert resident_after("lfu", history) == {0, 2, 3}  # 1 and 2 are used least; 1 less recently
    assert resident_after("lfru", history) == {1, 2, 3}  # 0's old uses have faded
    # but a recent burst of 0 keeps it under lfru where lru, seeing only the last use, drops it
    burst = [[1], [2], [0], [0], [0], [0], [1], [2], [3]]
    assert resident_after("lru", burst) == {1, 2, 3}
    assert resident_after("lfru", burst) == {0, 2, 3}


def test_a_failed_read_fails_its_step_and_leaves_the_cache_whole():
    """A read that raises (a disk error) fails the step that needed it; its slot is free again, not lost, so the
    next steps load into it (with one slot, a lost slot would fail every step after)."""
    store = FakeStore()
    cache = ExpertCache("moe", store, 1, "lru", torch.device("cpu"))
    list(cache.waves(torch.tensor([[2]])))
    read = store.read
    store.read = lambda *args: (_ for _ in ()).throw(OSError("EIO"))
    with pytest.raises(OSError):
        list(cache.waves(torch.tensor([[4]])))
    assert cache.slot_expert == [-1] and cache.expert_slot == {}
    store.read = read
    for slots in cache.waves(torch.tensor([[4]])):
        assert cache.slots["w13"][slots[slots >= 0], 0].tolist() == [4.0]
    assert cache.slot_expert == [4] and cache.resident_bytes <= cache.budget_bytes


def test_budget_below_top_k_runs_in_waves():
    cache = ExpertCache("moe", FakeStore(), 1, "lru", torch.device("cpu"))
    waves = list(cache.waves(torch.tensor([[4, 5], [5, 2]])))
    assert len(waves) == 3  # three experts, one slot
    covered = torch.stack(waves) >= 0
    assert covered.sum(0).eq(1).all()  # every (token, k) pair ran in exactly one wave
    assert int(cache.stats.misses.sum()) == 3 and cache.stats.bytes_loaded == 3 * cache.expert_bytes


def test_expert_cache_settings_are_checked(checkpoint):
    from localmoe.config import ConfigError

    with pytest.raises(ConfigError, match="expert_cache_policy"):
        engine(checkpoint, expert_cache_size=2, expert_cache_policy="fifo")
    with pytest.raises(ConfigError, match="expert_offload_target"):
        engine(checkpoint, expert_cache_size=2, expert_offload_target="tape")


FAMILIES = {  # tiny shapes; gpt-oss stores experts fused and transposed with gate/up interleaved
    "GptOss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=6),
    "DeepseekV3": dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
                       first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                       qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1),
    "Qwen2Moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                     shared_expert_intermediate_size=48),
}


@pytest.mark.parametrize("arch", FAMILIES)
def test_every_family_offloads_to_disk(tmp_path, arch):
    """Each family's own weight mapping replays on one expert's bytes (expert biases, shared experts and dense
    layers stay resident): one slot per layer, same tokens and logits as resident."""
    directory = make_checkpoint(tmp_path, arch, seed=2, **FAMILIES[arch])
    prompts = [{"prompt_token_ids": p} for p in prompts_of([9, 4], seed=3)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    runs = []
    for offload in ({}, {"expert_cache_size": 1, "expert_offload_target": "disk"}):
        llm = engine(directory, **offload)
        steps = record_logits(llm)
        runs.append(([o.outputs[0].token_ids for o in llm.generate(prompts, params)], torch.cat(steps)))
    assert runs[0][0] == runs[1][0]
    assert (runs[0][1] - runs[1][1]).abs().max() <= 1e-4
    assert all(int(c.stats.misses.sum()) > 0 for c in llm.engine.experts.caches)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("target", ["host", "disk"])
def test_cuda_offloading_with_side_stream_prefetch(checkpoint, target):
    """On CUDA: experts in pinned host memory (or the file), two slots on the device, prefetch copies on a side
    stream; the same tokens as the resident model on the same device."""
    resident_tokens, _, _ = run(checkpoint, device="cuda")
    tokens, _, core = run(checkpoint, device="cuda", expert_cache_size=2, expert_offload_target=target,
                          expert_prefetch=True)
    assert tokens == resident_tokens
    caches = core.experts.caches
    assert all(c.slots["w13"].is_cuda and c.copy_stream is not None for c in caches)
    assert sum(c.stats.prefetched for c in caches) > 0
    if target == "host":
        assert core.experts.store.layers[caches[0].path].host["w13"].is_pinned()


def test_cache_size_in_bytes_is_split_over_the_layers(checkpoint):
    """expert_cache_memory: a byte budget over all MoE layers, split evenly, whole experts per layer; it and
    expert_cache_size exclude each other, and a budget below one expert is refused naming the minimum."""
    from localmoe.config import ConfigError

    probe = engine(checkpoint, expert_cache_size=1, expert_offload_target="disk")
    expert_bytes, layers = probe.engine.experts.caches[0].expert_bytes, len(probe.engine.experts.caches)
    llm = engine(checkpoint, expert_cache_memory=str(layers * 3 * expert_bytes + expert_bytes),
                 expert_offload_target="disk")
    caches = llm.engine.experts.caches
    assert [c.capacity for c in caches] == [3] * layers
    out = llm.generate({"prompt_token_ids": prompts_of([9], seed=3)[0]}, SamplingParams(max_tokens=3))[0]
    assert len(out.outputs[0].token_ids) == 3 and all(int(c.stats.misses.sum()) > 0 for c in caches)
    assert llm.engine.snapshot.memory["expert_cache"]["experts_per_layer"] == 3
    with pytest.raises(ConfigError, match="not both"):
        engine(checkpoint, expert_cache_size=2, expert_cache_memory="1GiB")
    with pytest.raises(ConfigError, match="expert_cache_memory"):
        engine(checkpoint, expert_cache_memory="plenty")
    with pytest.raises(ValueError, match=f"at least {expert_bytes} bytes"):
        engine(checkpoint, expert_cache_memory=str(expert_bytes - 1))


def test_a_budget_below_one_expert_a_layer_shares_its_slots_between_layers(checkpoint, resident):
    """expert_cache_memory of fewer experts than MoE layers: the layers share one pool of slots (a layer's miss
    evicts another layer's expert), and the outputs are still the resident ones."""
    probe = engine(checkpoint, expert_cache_size=1, expert_offload_target="disk")
    expert_bytes, layers = probe.engine.experts.caches[0].expert_bytes, len(probe.engine.experts.caches)
    assert layers >= 2
    tokens, steps, core = run(checkpoint, expert_cache_memory=str(expert_bytes + expert_bytes // 2),
                              expert_offload_target="disk", expert_prefetch=True)
    caches = core.experts.caches
    assert len({id(c.pool) for c in caches}) == 1 and caches[0].capacity == 1
    assert tokens == resident[0]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(steps, resident[1]))
    assert all(int(c.stats.misses.sum()) > NEW for c in caches)  # each layer reloads what the others evicted
    memory = core.snapshot.memory["expert_cache"]
    assert memory["shared_slots"] and memory["slots"] == 1 and memory["budget_bytes"] == expert_bytes
    stats = core.snapshot.experts["layers"]
    assert all(layer["cache"]["shared_slots"] for layer in stats)


def test_layers_sharing_a_pool_evict_each_others_experts_and_prefetch_never_takes_a_pinned_slot():
    store = FakeStore()
    store.add_layer("moe2", 6, {"w13": (1,), "w2": (1,)})
    for kind in ("w13", "w2"):
        store.layers["moe2"].host[kind].copy_(10 + torch.arange(6.0)[:, None])
    pool = SlotPool(store.layers["moe"].form.tensors, 2, "lru", torch.device("cpu"))
    first, second = (ExpertCache(path, store, 2, "lru", torch.device("cpu"), pool=pool) for path in ("moe", "moe2"))
    list(first.waves(torch.tensor([[1, 2]])))
    assert first.expert_slot.keys() == {1, 2} and second.expert_slot == {}
    for slots in second.waves(torch.tensor([[4]])):  # evicts layer moe's least recent expert
        assert pool.slots["w13"][slots[slots >= 0], 0].tolist() == [14.0]
        first.prefetch([3, 5])  # while moe2's wave reads its slot: only the other slot may be taken
        assert second.expert_slot == {4: slots.max().item()}
    assert len(first.expert_slot) == 1 and set(first.expert_slot) <= {2, 3}
    assert int(first.stats.prefetches.sum()) == 1 and pool.pinned == set()
    assert first.slot_expert.count(-1) == 1 and second.slot_expert.count(-1) == 1


@pytest.mark.parametrize("target", ["disk", "host"])
def test_auto_cache_size_takes_what_the_memory_limit_leaves(checkpoint, monkeypatch, target):
    """expert_cache_memory auto: the process's limit (here a pretend cgroup) less what it holds and what is still
    to come (KV pool, swap space, the runtime reserve, and with the host target the store's own copy of the
    experts), in whole experts per layer."""
    from localmoe.experts import memory_budget

    probe = engine(checkpoint, expert_cache_size=1, expert_offload_target=target)
    expert_bytes, layers = probe.engine.experts.caches[0].expert_bytes, len(probe.engine.experts.caches)
    store_bytes = probe.engine.experts.caches[0].store.host_bytes()
    assert (store_bytes > 0) == (target == "host")
    kv = 8 * 2**20  # family_parity.engine's pool
    held = memory_budget.resident_bytes()
    limit = held + kv + memory_budget.RUNTIME_RESERVE + store_bytes + layers * 5 * expert_bytes + 100
    monkeypatch.setattr(memory_budget, "cgroup_limit", lambda: limit)
    monkeypatch.setattr(memory_budget, "resident_bytes", lambda: held)
    llm = engine(checkpoint, expert_cache_memory="auto", expert_offload_target=target, swap_space=0)
    assert [c.capacity for c in llm.engine.experts.caches] == [5] * layers
    monkeypatch.setattr(memory_budget, "cgroup_limit", lambda: held + kv)  # nothing left for experts
    with pytest.raises(ValueError, match="less than one expert"):
        engine(checkpoint, expert_cache_memory="auto", expert_offload_target=target, swap_space=0)


def test_cgroup_limits_are_read_for_v1_and_v2(tmp_path):
    from localmoe.experts.memory_budget import cgroup_limit

    (tmp_path / "memory" / "bench").mkdir(parents=True)
    (tmp_path / "memory" / "bench" / "memory.limit_in_bytes").write_text("1258291200\n")
    assert cgroup_limit("4:cpu:/\n7:memory:/bench\n", tmp_path) == 1258291200
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_limit("7:memory:/\n", tmp_path) is None  # v1's "no limit"
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "memory.max").write_text("max\n")
    assert cgroup_limit("0::/app\n", tmp_path) is None
    (tmp_path / "app" / "memory.max").write_text("629145600\n")
    assert cgroup_limit("0::/app\n", tmp_path) == 629145600


def test_a_shared_pool_smaller_than_a_step_keeps_the_layers_that_run_next():
    """Three layers in turn, one expert each, two shared slots: least-recently-used would evict each expert just
    before its layer runs again and never hit; evicting from the layer that runs again last hits every other
    time (Belady's optimum for a cycle)."""
    store = ExpertStore("host", torch.float32, weight_map=lambda name, t: [])
    for path in ("a", "b", "c"):
        store.add_layer(path, 2, {"w13": (1,), "w2": (1,)})
    pool = SlotPool(store.layers["a"].form.tensors, 2, "lru", torch.device("cpu"))
    caches = [ExpertCache(path, store, 2, "lru", torch.device("cpu"), pool=pool) for path in ("a", "b", "c")]
    for _ in range(10):
        for cache in caches:
            list(cache.waves(torch.tensor([[0]])))
    hits = sum(int(c.stats.hits.sum()) for c in caches)
    assert hits == 14  # every other access of the 30 after the first two, which fill the pool

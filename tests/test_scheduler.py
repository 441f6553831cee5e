"""Scheduling situations forced with tiny pools and budgets; outputs must not change."""

from __future__ import annotations

import torch

from localmoe import LLM, SamplingParams

PARAMS = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def prompts(n: int, length: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(3, 263, (length + 3 * i,), generator=g).tolist()} for i in range(n)]


def token_ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_chunked_prefill_splits_long_prompts_and_keeps_outputs(tiny_mixtral_dir):
    batch = prompts(3, 40)
    whole = LLM(model=str(tiny_mixtral_dir), dtype="float32", kv_cache_memory=2**23, max_num_batched_tokens=512)
    chunked = LLM(model=str(tiny_mixtral_dir), dtype="float32", kv_cache_memory=2**23, max_num_batched_tokens=16)
    assert token_ids(chunked.generate(batch, PARAMS)) == token_ids(whole.generate(batch, PARAMS))
    assert chunked.engine.stats.num_prefill_chunks_total > 0
    assert whole.engine.stats.num_prefill_chunks_total == 0


def test_decodes_keep_flowing_during_a_long_prefill(tiny_mixtral_dir):
    llm = LLM(model=str(tiny_mixtral_dir), dtype="float32", kv_cache_memory=2**23, max_num_batched_tokens=16)
    engine = llm.engine
    engine.add_request("short", None, [5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.add_request("long", None, list(range(3, 200)), SamplingParams(max_tokens=1))
    produced = 0
    for _ in range(5):  # the 197-token prompt needs many 16-token steps; the decode runs in each
        for out in engine.step():
            if out.request_id == "short":
                produced = len(out.outputs[0].token_ids)
    assert produced == 6


def test_preemption_when_blocks_run_out_keeps_outputs(tiny_mixtral_dir):
    batch = prompts(6, 20, seed=1)
    roomy = LLM(model=str(tiny_mixtral_dir), dtype="float32", kv_cache_memory=2**23, block_size=4)
    # 3 layers * 2 * 4 slots * 2 heads * 16 dims * 4 bytes = 3 KiB a block: 40 blocks = 160 tokens
    tight = LLM(model=str(tiny_mixtral_dir), dtype="float32", kv_cache_memory=40 * 3072, block_size=4,
                max_model_len=128)
    assert tight.engine.block_manager.num_blocks == 40
    assert token_ids(tight.generate(batch, PARAMS)) == token_ids(roomy.generate(batch, PARAMS))
    assert tight.engine.stats.num_preemptions_total > 0
    assert roomy.engine.stats.num_preemptions_total == 0
    assert tight.engine.block_manager.usage == 0


def test_max_num_seqs_caps_the_running_set(tiny_mixtral_dir):
    llm = LLM(model=str(tiny_mixtral_dir), dtype="float32", kv_cache_memory=2**23, max_num_seqs=2)
    engine = llm.engine
    for i, p in enumerate(prompts(5, 8)):
        engine.add_request(str(i), None, p["prompt_token_ids"], SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()
    assert engine.stats.num_running == 2 and engine.stats.num_waiting == 3
    while engine.has_unfinished_requests():
        engine.step()


def test_priority_orders_admission(tiny_mixtral_dir):
    llm = LLM(model=str(tiny_mixtral_dir), dtype="float32", kv_cache_memory=2**23, max_num_seqs=1)
    engine = llm.engine
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    engine.add_request("later", None, [5, 6], params, priority=5)
    engine.add_request("urgent", None, [7, 8], params, priority=-1)
    engine.add_request("also-later", None, [9, 10], params, priority=5)
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["urgent", "later", "also-later"]


def test_swap_preemption_moves_kv_to_host_and_keeps_outputs(tiny_mixtral_dir):
    batch = prompts(6, 20, seed=1)
    roomy = LLM(model=str(tiny_mixtral_dir), dtype="float32", kv_cache_memory=2**23, block_size=4)
    swapping = LLM(model=str(tiny_mixtral_dir), dtype="float32", kv_cache_memory=40 * 3072, block_size=4,
                   max_model_len=128, swap_space=200 * 3072 / 2**30)
    assert swapping.engine.block_manager.free_swap_blocks and len(swapping.engine.block_manager.free_swap_blocks) == 200
    assert token_ids(swapping.generate(batch, PARAMS)) == token_ids(roomy.generate(batch, PARAMS))
    stats = swapping.engine.stats
    assert stats.num_swapped_out_total > 0 and stats.num_preemptions_total >= stats.num_swapped_out_total
    assert swapping.engine.block_manager.usage == 0
    assert len(swapping.engine.block_manager.free_swap_blocks) == 200  # every host block came back

"""Expert parallelism over data-parallel ranks (data_parallel_size 2 with enable_expert_parallel; gloo on CPU) on
tiny random Mixtral, Qwen2-MoE (shared expert) and DeepSeek-V3 (MLA, a dense first layer) checkpoints: two rank
processes, each with requests of its own, compute the logits (within 1e-4) and the 32 greedy tokens one process
computes for the same requests, with prefix caching and chunked prefill on; the rank that runs out of requests
first takes part in the other's steps by dummy steps; each rank holds half the routed experts; the collectives'
bytes are the planner's. Then `localmoe serve --data-parallel-size 2 --enable-expert-parallel` through the
openai client, whose killed replica fails the other's requests and /health instead of hanging it; the planner's
figures and the refusals."""

from __future__ import annotations

import json
import multiprocessing as mp
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import httpx
import openai
import pytest
from pytest import approx
from typer.testing import CliRunner

from family_parity import TOL, engine, prompts_of, record_logits
from localmoe import SamplingParams
from localmoe.cli import app
from localmoe.config import ConfigError, EngineConfig, load_config
from localmoe.distributed import data_parallel
from localmoe.distributed.executor import free_port
from localmoe.distributed.layout import layout_plan
from server_process import API_KEY, auth, healthy, serve
from test_data_parallel import kill_a_replica_during, per_replica
from test_expert_parallel import PLACEMENTS, stats_file
from test_tensor_parallel import NEW, SERVE_FLAGS, SETTINGS, assert_served_as_one_process, family_checkpoints

DP_EP = {"data_parallel_size": 2, "enable_expert_parallel": True}
DP_EP_FLAGS = ("--data-parallel-size", "2", "--enable-expert-parallel")
SHORT = 8  # rank 1's first request ends this many tokens in, while rank 0's runs on: rank 1 then takes dummy steps


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Callable[[str], Path]:
    return family_checkpoints(tmp_path_factory)


def workloads() -> list[list[tuple[list[list[int]], int]]]:
    """Each rank's generate calls (prompts, max_tokens): rank 0 one prompt, then three sharing its 19-token prefix
    with a 45-token one (chunked); rank 1 one prompt that stops early, then two sharing its prefix."""
    shared = prompts_of([19], seed=7)[0]
    rank0 = [shared + tail for tail in prompts_of([3, 6, 1], seed=8)] + prompts_of([45], seed=9)
    other = prompts_of([13], seed=10)[0]
    rank1 = [other + tail for tail in prompts_of([2, 5, 9], seed=11)]
    return [[(rank0[:1], NEW), (rank0[1:], NEW)], [(rank1[:1], SHORT), (rank1[1:], NEW)]]


def run_workload(llm, calls: list[tuple[list[list[int]], int]]) -> tuple[list, list[list[int]]]:
    """Every step's logits and each request's greedy tokens."""
    steps = record_logits(llm)
    tokens = []
    for prompts, max_tokens in calls:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        tokens += [o.outputs[0].token_ids for o in outs]
    return steps, tokens


def run_rank(rank: int, port: int, checkpoint: Path, settings: dict, results: mp.Queue) -> None:
    """One data-parallel rank's process: its workload, and what the test checks of it."""
    import torch
    torch.set_num_threads(1)
    llm = engine(checkpoint, **DP_EP, data_parallel_rank=rank, data_parallel_master_port=port, **settings)
    try:
        steps, tokens = run_workload(llm, workloads()[rank])
        eng = llm.engine
        eng.publish_stats()
        plan = layout_plan(eng.config, eng.hf_config, eng.device, 2**40, 64)
        stats = eng.stats
        owners = [moe.experts.owner.tolist() for moe in eng.observer.blocks]
        results.put((rank, {"steps": [step.numpy() for step in steps], "tokens": tokens, "expert_bytes": eng.runner.expert_bytes(),
                            "experts": eng.snapshot.experts, "owners": owners,
                            "plan": (plan.all_gather_bytes_per_token, plan.reduce_scatter_bytes_per_token),
                            "prefix_hits": stats.prefix_cache_hits, "chunks": stats.num_prefill_chunks_total}))
    finally:
        llm.engine.runner.shutdown()


def run_ranks(checkpoint: Path, settings: dict) -> list[dict]:
    """Both ranks' results, rank 0 first."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=run_rank, args=(rank, port, checkpoint, settings, results))
                 for rank in range(2)]
    for process in processes:
        process.start()
    try:
        got = dict(results.get(timeout=240) for _ in processes)
    finally:
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
    return [got[0], got[1]]


@pytest.mark.parametrize("family", list(PLACEMENTS))
def test_dp2_ep_equals_one_process(checkpoints, family, tmp_path):
    checkpoint = checkpoints(family)
    expected = []
    for calls in workloads():
        single = engine(checkpoint, **SETTINGS)
        expected.append(run_workload(single, calls))
    whole = single.engine.runner.expert_bytes()
    placement = {"expert_placement": PLACEMENTS[family]}
    if family == "deepseek_v3":
        placement["expert_placement_stats"] = str(stats_file(tmp_path, single))
    ranks = run_ranks(checkpoint, {**SETTINGS, **placement})

    for rank, (got, (want_steps, want_tokens)) in enumerate(zip(ranks, expected)):
        assert got["tokens"] == want_tokens, f"rank {rank}"
        assert len(got["steps"]) == len(want_steps)
        for ours, theirs in zip(got["steps"], want_steps):
            assert ours.shape == theirs.shape
            assert abs(ours - theirs.numpy()).max() <= TOL
        assert got["prefix_hits"] > 0
        # each rank holds half of the routed experts (its own byte count), the same placement as the other
        assert got["expert_bytes"] == approx(whole / 2, rel=0.01)
        assert got["owners"] == ranks[0]["owners"]
        parallel = got["experts"]["parallel"]
        assert parallel["data_parallel_size"] == 2 and parallel["data_parallel_rank"] == rank
        # tokens per rank: where this rank's routed tokens went
        spread = parallel["expert_parallel"]
        assert sum(spread["tokens_per_rank"]) == got["experts"]["totals"]["tokens_routed"] > 0
        assert all(n > 0 for n in spread["tokens_per_rank"]) and spread["rank_imbalance"] >= 1.0
        # the collectives moved what the planner says for every row exchanged (padded to the busier rank)
        moved = parallel["collective_bytes"]
        gathered, scattered = got["plan"]
        assert moved["padded_rows"] >= moved["tokens"] > 0
        assert moved["all_gather_bytes"] == moved["padded_rows"] * gathered > 0
        assert moved["reduce_scatter_bytes"] == moved["padded_rows"] * scattered > 0
        assert moved["all_reduce_bytes"] == moved["gather_bytes"] == 0
    assert ranks[0]["chunks"] > 0  # the 45-token prompt, in 16-token chunks
    # rank 1's first request ended while rank 0's decoded on: rank 1 joined those steps with no tokens
    assert ranks[1]["experts"]["parallel"]["dummy_steps"] >= NEW - SHORT


def test_served_dp2_ep_equals_one_process_then_a_replica_dies(checkpoints, tmp_path):
    """Requests on both replicas answer as one process would; then a killed replica ends the other's request with
    an error (it cannot step alone) and /health fails, on the front and on the surviving replica."""
    checkpoint = checkpoints("qwen2_moe")
    prompts = ["Experts spread over replicas", "Mixture of experts, each whole on one rank",
               "Attention stays with its replica", "Every step together"]
    single = engine(checkpoint, **SETTINGS)
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, logprobs=1)
    expected = [single.generate(prompt, params)[0] for prompt in prompts]
    with serve(tmp_path, "--model", str(checkpoint), *SERVE_FLAGS, *DP_EP_FLAGS, "--expert-placement",
               "round-robin") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        with ThreadPoolExecutor(len(prompts)) as pool:
            served = list(pool.map(lambda p: client.completions.create(
                model=model, prompt=p, max_tokens=NEW, temperature=0, logprobs=1, extra_body={"ignore_eos": True}),
                prompts))
        for answer, want in zip(served, expected):
            assert_served_as_one_process(answer, [want])
        # a client that leaves mid-stream: its replica aborts the request and the ranks step on together
        body = {"model": model, "prompt": "Go on", "max_tokens": 500, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=auth(), timeout=60) as answer:
            lines = answer.iter_lines()
            assert any(next(lines).startswith("data: {") for _ in range(4))
        again = client.completions.create(model=model, prompt=prompts[0], max_tokens=NEW, temperature=0,
                                          logprobs=1, extra_body={"ignore_eos": True})
        assert_served_as_one_process(again, expected[:1])
        for replica in range(2):
            experts = httpx.get(f"{server.url}/v1/stats/experts?replica={replica}", headers=auth()).json()
            parallel = experts["parallel"]
            assert parallel["data_parallel_rank"] == replica and parallel["expert_placement"] == "round-robin"
            assert sum(parallel["expert_parallel"]["tokens_per_rank"]) == experts["totals"]["tokens_routed"] > 0
            assert parallel["collective_bytes"]["all_gather_bytes_per_token"] > 0

        def run(i: int) -> str:
            try:
                chunks = list(client.completions.create(model=model, prompt=f"stream {i}", max_tokens=1000,
                                                        stream=True, extra_body={"ignore_eos": True}))
                return chunks[-1].choices[0].finish_reason
            except openai.APIError as e:
                return f"error: {e}"

        outcomes = kill_a_replica_during(server, run, 1)
        assert all(o.startswith("error:") for o in outcomes), outcomes
        assert any("collective failed" in o for o in outcomes)  # the survivor's own request
        assert not healthy(server.url)
        # the survivor answers, and refuses to serve: its group has failed (what its own /health reports)
        answer = httpx.post(f"{server.url}/v1/completions", headers=auth(), timeout=30,
                            json={"model": model, "prompt": "after", "max_tokens": 2})
        assert answer.status_code == 503 and "collective failed" in answer.json()["error"]["message"]


def test_sigterm_drains_a_request_whose_replica_needs_the_idle_ones_steps(checkpoints, tmp_path):
    """One request in flight, on one replica: SIGTERM drains both, and the idle one steps on (its engine shut down)
    until the other's request is done."""
    with serve(tmp_path, "--model", str(checkpoints("mixtral")), *SERVE_FLAGS, *DP_EP_FLAGS) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(client.completions.create, model=model, prompt="Drain me", max_tokens=300,
                                 extra_body={"ignore_eos": True})
            deadline = time.monotonic() + 30
            while sum(per_replica(server.url)["vllm:num_requests_running"].values()) != 1:
                assert time.monotonic() < deadline, "the request did not start"
                time.sleep(0.02)
            server.process.send_signal(signal.SIGTERM)
            assert answer.result(timeout=120).choices[0].finish_reason == "length"
        assert server.process.wait(timeout=60) == 0


def test_plan_prints_memory_per_rank_and_collective_bytes_per_token():
    """Mixtral-8x7B (32 MoE layers, D 4096, top-2 of 8 experts of 3 x 4096 x 14336, bf16) over 2 data-parallel
    ranks: half the experts each, everything else whole; per token each MoE layer all-gathers D activations and
    the routing (2 x 2 float32) and reduce-scatters both ranks' rows."""
    runner = CliRunner()
    result = runner.invoke(app, ["plan", "Mixtral-8x7B", "--data-parallel-size", "2", "--enable-expert-parallel",
                                 "--json"])
    assert result.exit_code == 0, result.output
    layout = json.loads(result.output)["layout"]
    whole = json.loads(runner.invoke(app, ["plan", "Mixtral-8x7B", "--json"]).output)
    expert = 3 * 4096 * 14336 * 2
    assert layout["data_parallel_size"] == 2 and layout["experts_per_rank"] == 4
    assert layout["expert_bytes_per_rank"] == 32 * 4 * expert
    assert layout["weight_bytes_per_rank"] == whole["weight_bytes"] - 32 * 4 * expert
    assert layout["all_gather_bytes_per_token"] == 32 * (4096 * 2 + 2 * 2 * 4)
    assert layout["reduce_scatter_bytes_per_token"] == 32 * 2 * 4096 * 2
    assert layout["all_reduce_bytes_per_token"] == layout["gather_bytes_per_sampled_token"] == 0
    assert layout["link_bytes_per_token"] == 32 * (4096 * 2 + 16) + 32 * 4096 * 2  # a ring over 2 ranks
    text = runner.invoke(app, ["plan", "Mixtral-8x7B", "--data-parallel-size", "2", "--enable-expert-parallel"])
    assert "data_parallel_size 2, expert parallel" in text.output and "all-gather 256.50 KiB" in text.output
    refused = runner.invoke(app, ["plan", "Mixtral-8x7B", "--data-parallel-size", "2"])
    assert refused.exit_code == 2 and "with --enable-expert-parallel" in refused.output


@pytest.mark.parametrize("settings, refused", [
    ({**DP_EP, "tensor_parallel_size": 2}, "enable_expert_parallel: expert parallelism over data-parallel replicas "
                                           "of a tensor-parallel engine"),
    ({"data_parallel_size": 2, "data_parallel_rank": 0}, "data_parallel_rank: a data-parallel rank is served alone"),
    ({**DP_EP, "data_parallel_rank": 2}, r"data_parallel_rank must be in \[0, data_parallel_size 2\)"),
    ({**DP_EP, "enable_lora": True}, "enable_lora: LoRA adapters are not available with expert parallelism over"),
    ({**DP_EP, "speculative_config": {"method": "ngram", "num_speculative_tokens": 2}},
     "speculative_config: speculative decoding is not available"),
])
def test_refused_settings_name_their_key(settings, refused):
    with pytest.raises(ConfigError, match=refused):
        EngineConfig(**settings).validate()


def test_a_layout_that_cannot_fit_is_refused_before_the_ranks_meet(checkpoints):
    with pytest.raises(ConfigError, match=r"data_parallel_size: 2 ranks \(expert parallel\) do not fit: each needs "
                                          r".*localmoe plan --data-parallel-size 2 --enable-expert-parallel"):
        engine(checkpoints("mixtral"), **DP_EP, data_parallel_rank=0, kv_cache_memory="64TiB")


def test_one_model_per_server(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("vllm:\n  data_parallel_size: 2\n  enable_expert_parallel: true\nmodels:\n"
                    "  - model_name: localmoe-builtin\n    served_model_name: a\n"
                    "  - model_name: localmoe-builtin\n    served_model_name: b\n")
    with pytest.raises(ConfigError, match="enable_expert_parallel: the replicas' ranks meet in one process group"):
        data_parallel.data_parallel_size(load_config(path))

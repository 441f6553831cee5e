"""Tensor parallelism over worker processes (gloo on CPU) against the single-process engine, on tiny random
Mixtral, Qwen2-MoE, OLMoE and DeepSeek-V3 checkpoints: the same logits within 1e-4 and the same 32 greedy tokens
with prefix caching and chunked prefill on, through the Python API (all four) and through `localmoe serve` with the
openai client (Mixtral, Qwen2-MoE); each rank holds about half the weights; a killed worker fails /health and the
request in flight; no process outlives the server."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable

import httpx
import openai
import psutil
import pytest
from pytest import approx

from checkpoints import make_checkpoint
from family_parity import TOL, engine, prompts_of, record_logits
from localmoe import SamplingParams
from localmoe.config import ConfigError, EngineConfig
from server_process import API_KEY, SMALL_KV, ServerProcess, serve
from test_deepseek import checkpoint as deepseek_checkpoint

# Mixtral with tied embeddings (the head shares the vocabulary shard); Qwen2-MoE with its gated shared expert,
# q/k/v biases and one KV head, replicated on both ranks; OLMoE with QK-norm over the whole projection (its mean
# square taken across the ranks); DeepSeek-V3 (test_deepseek's shape) with MLA (low-rank queries, YaRN), a dense
# first layer and a shared expert. The vocabulary (263) is odd: the last shard is padded.
FAMILIES = {
    "mixtral": ("mixtral", {"tie_word_embeddings": True}),
    "qwen2_moe": ("Qwen2Moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                               "shared_expert_intermediate_size": 48, "num_key_value_heads": 1}),
    "olmoe": ("Olmoe", {"num_experts": 4, "num_experts_per_tok": 2}),
}
SERVED = ["mixtral", "qwen2_moe"]
# small steps, so the 45-token prompt is prefilled in chunks; small blocks, so the shared prefix fills some
SETTINGS = {"enable_prefix_caching": True, "enable_chunked_prefill": True, "max_num_batched_tokens": 16}
NEW = 32
# `localmoe serve`'s flags for the engine() settings
SERVE_FLAGS = ("--dtype", "float32", "--block-size", "4", *SMALL_KV, *(
    f"--{key.replace('_', '-')}" if value is True else f"--{key.replace('_', '-')}={value}"
    for key, value in SETTINGS.items()))


def family_checkpoints(tmp_path_factory) -> Callable[[str], Path]:
    """Each family's checkpoint, written on first use (test_expert_parallel.py's fixture too)."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            directory = tmp_path_factory.mktemp(family)
            if family == "deepseek_v3":
                made[family] = deepseek_checkpoint(directory, "v3-lora-q-grouped-yarn", seed=5)
            else:
                arch, overrides = FAMILIES[family]
                made[family] = make_checkpoint(directory, arch, seed=5, **overrides)
        return made[family]
    return get


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Callable[[str], Path]:
    """Each family's checkpoint, written once for the module."""
    return family_checkpoints(tmp_path_factory)


def run_prompts(llm) -> tuple[list, list[list[int]]]:
    """Every step's logits and each request's greedy tokens: one prompt alone, then three sharing its 19-token
    prefix batched with a 45-token one."""
    steps = record_logits(llm)
    shared = prompts_of([19], seed=7)[0]
    prompts = [shared + tail for tail in prompts_of([3, 6, 1], seed=8)] + prompts_of([45], seed=9)
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    outs = llm.generate({"prompt_token_ids": prompts[0]}, params)
    outs += llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], params)
    return steps, [o.outputs[0].token_ids for o in outs]


def assert_runs_as_one_process(llm, expected_steps: list, expected_tokens: list[list[int]]) -> None:
    """run_prompts on `llm` gives the logits and tokens one process gave, prefix caching and chunked prefill used."""
    steps, tokens = run_prompts(llm)
    stats = llm.engine.stats
    assert stats.prefix_cache_hits > 0 and stats.num_prefill_chunks_total > 0
    assert tokens == expected_tokens and all(len(t) == NEW for t in tokens)
    assert len(steps) == len(expected_steps)
    for ours, theirs in zip(steps, expected_steps):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() <= TOL


def assert_served_as_one_process(served, expected: list) -> None:
    """A served completion's texts and log-probabilities are those of one process's RequestOutputs."""
    for choice, want in zip(sorted(served.choices, key=lambda c: c.index), expected):
        assert choice.text == want.outputs[0].text
        theirs = [next(iter(d.values())).logprob for d in want.outputs[0].logprobs]
        assert choice.logprobs.token_logprobs == approx(theirs, abs=TOL)


@pytest.mark.parametrize("family", [*FAMILIES, "deepseek_v3"])
def test_tp2_equals_one_process(checkpoints, family):
    checkpoint = checkpoints(family)
    single = engine(checkpoint, **SETTINGS)
    expected_steps, expected_tokens = run_prompts(single)
    tp = engine(checkpoint, tensor_parallel_size=2, **SETTINGS)
    try:
        assert_runs_as_one_process(tp, expected_steps, expected_tokens)
        # each rank counts its own weights: half of one process's, plus the few replicated (norms, routers; MLA's
        # latent projections are every head's)
        per_rank = tp.engine.runner.rank_weight_bytes()
        whole = single.engine.runner.weight_bytes()
        assert len(per_rank) == 2 and all(b == approx(whole / 2, rel=0.2 if family == "deepseek_v3" else 0.05)
                                          for b in per_rank)
    finally:
        tp.engine.runner.shutdown()
    assert tp.engine.runner.health_problem() is not None  # stopped workers are reported, not reused


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def workers_of(pid: int) -> list[psutil.Process]:
    """The server's tensor-parallel worker processes (its spawned children, not multiprocessing's helpers)."""
    return [p for p in descendants(pid) if "spawn_main" in " ".join(p.cmdline())]


def kill_during_a_stream(server: ServerProcess, client: openai.OpenAI, pid: int) -> None:
    """SIGKILL process `pid` (a worker) while a stream is in flight: the stream ends with an error and /health
    answers 503 within seconds."""
    stream = client.completions.create(model=client.models.list().data[0].id, prompt="A long answer",
                                       max_tokens=3000, temperature=0, stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/health").status_code != 503:
        assert time.monotonic() < deadline, "/health did not report the dead worker"
        time.sleep(0.2)


@pytest.mark.parametrize("family", SERVED)
def test_served_tp2_equals_one_process_then_a_worker_dies(checkpoints, family, tmp_path):
    """The served engine's tokens and log-probabilities are the single process's. Then, on Mixtral, SIGTERM
    leaves no process behind; on Qwen2-MoE, a killed worker fails /health and the stream in flight, and the
    server still exits cleanly."""
    checkpoint = checkpoints(family)
    prompts = ["The tensor-parallel engine", "Mixture of experts, split over ranks"]
    single = engine(checkpoint, **SETTINGS)
    expected = single.generate(prompts, SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, logprobs=1))
    with serve(tmp_path, "--model", str(checkpoint), *SERVE_FLAGS, "--tensor-parallel-size", "2") as server:
        workers = workers_of(server.process.pid)
        assert len(workers) == 1
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
        model = client.models.list().data[0].id
        served = client.completions.create(model=model, prompt=prompts, max_tokens=NEW, temperature=0, logprobs=1,
                                           extra_body={"ignore_eos": True})
        assert_served_as_one_process(served, expected)
        if family == "mixtral":
            everyone = descendants(server.process.pid)
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(timeout=60) == 0
            psutil.wait_procs(everyone, timeout=15)
            assert not [p for p in everyone if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            return
        kill_during_a_stream(server, client, workers[0].pid)
        everyone = descendants(server.process.pid)
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=60)
        psutil.wait_procs(everyone, timeout=15)
        assert not [p for p in everyone if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("settings, refused", [
    ({"ray_cpus_per_worker": 0}, "ray_cpus_per_worker must be positive"),
    ({"distributed_executor_backend": "threads"}, "not one of mp, ray"),
    ({"tensor_parallel_size": 0}, "must be positive"),
    ({"tensor_parallel_size": 2, "expert_cache_size": 2}, "add enable_expert_parallel"),
])
def test_refused_layouts_name_their_key(settings, refused):
    with pytest.raises(ConfigError, match=refused):
        EngineConfig(**settings).validate()

"""Data parallelism: `localmoe serve --data-parallel-size 2` on a tiny random Mixtral (float32), one server for the
module, through the openai client; Qwen2-MoE and DeepSeek-V3 each get a server of their own for greedy parity. Greedy outputs equal the offline engine's; a burst lands on both replicas;
requests sharing a long prefix land on one replica, whose prefix cache hits; a client that leaves aborts its
request on its replica; a killed replica fails /health and ends exactly its own in-flight requests with an error
while the other keeps serving. The router's choices and the refusals are checked without a server."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import httpx
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from family_parity import engine
from localmoe import SamplingParams
from localmoe.config import ConfigError, load_config
from localmoe.distributed import data_parallel
from localmoe.server.dp_router import AFFINITY_SLACK, PREFIX_BLOCK_CHARS, Router, prefix_blocks
from server_process import API_KEY, SMALL_KV, auth, healthy, serve
from test_tensor_parallel import family_checkpoints

PROMPTS = ["The first replica", "Data parallel serving", "Mixture of experts", "Route me anywhere",
           "Four more words here", "One two three", "Least loaded wins", "Abort nothing"]
SHARED = "A system prompt long enough to fill several prefix-cache blocks, which every request repeats. " * 4
NEW = 16


@pytest.fixture(scope="module")
def server(tiny_mixtral_dir: Path, tmp_path_factory):
    with serve(tmp_path_factory.mktemp("dp"), "--model", str(tiny_mixtral_dir), "--dtype", "float32", *SMALL_KV,
               "--data-parallel-size", "2") as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    # no retries: a request the server fails must show as failed, not be sent again to the surviving replica
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def per_replica(url: str) -> dict[str, Counter]:
    """Every sample on /metrics summed by name and replica (other labels dropped; histograms' buckets left out)."""
    text = httpx.get(f"{url}/metrics", headers=auth()).text
    totals: dict[str, Counter] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if "le" not in s.labels and "replica" in s.labels:
                totals.setdefault(s.name, Counter())[s.labels["replica"]] += s.value
    return totals


def delta(before: dict[str, Counter], after: dict[str, Counter], name: str) -> dict[str, float]:
    return {replica: after[name][replica] - before.get(name, Counter())[replica] for replica in ("0", "1")}


def complete(client: openai.OpenAI, model: str, prompt: str, max_tokens: int = NEW, **fields):
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **fields)


def test_greedy_outputs_equal_the_offline_engine_and_a_burst_lands_on_both(server, client, tiny_mixtral_dir):
    model = client.models.list().data[0].id
    expected = engine(tiny_mixtral_dir, block_size=16).generate(PROMPTS, SamplingParams(max_tokens=NEW, temperature=0))
    before = per_replica(server.url)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(lambda p: complete(client, model, p), PROMPTS))
    assert [a.choices[0].text for a in answers] == [e.outputs[0].text for e in expected]
    after = per_replica(server.url)
    served = delta(before, after, "vllm:request_success_total")
    assert sum(served.values()) == len(PROMPTS) and all(n > 0 for n in served.values()), served
    routed = delta(before, after, "localmoe:dp_requests_routed_total")
    assert routed == served


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_other_families_serve_as_one_process(family, tmp_path_factory):
    """Qwen2-MoE (gated shared expert) and DeepSeek-V3 (MLA, dense first layer, grouped sigmoid routing), one server
    each: a burst's greedy outputs are the offline engine's, and both replicas served some of it."""
    checkpoint = family_checkpoints(tmp_path_factory)(family)
    prompts = PROMPTS[:4]
    expected = engine(checkpoint, block_size=16).generate(prompts, SamplingParams(max_tokens=NEW, temperature=0))
    with serve(tmp_path_factory.mktemp(f"dp-{family}"), "--model", str(checkpoint), "--dtype", "float32",
               *SMALL_KV, "--data-parallel-size", "2") as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(lambda p: complete(client, model, p), prompts))
        assert [a.choices[0].text for a in answers] == [e.outputs[0].text for e in expected]
        served = per_replica(running.url)["vllm:request_success_total"]
        assert sum(served.values()) == len(prompts) and all(served[r] > 0 for r in ("0", "1")), served


def test_requests_sharing_a_prefix_land_on_one_replica_and_hit_its_cache(server, client):
    model = client.models.list().data[0].id
    before = per_replica(server.url)
    for tail in ("Question one?", "Question two?", "Question three?", "Question four?"):
        complete(client, model, SHARED + tail)
    after = per_replica(server.url)
    served = delta(before, after, "vllm:request_success_total")
    owner = max(served, key=served.get)
    assert served[owner] == 4, served
    other = "1" if owner == "0" else "0"
    hits = delta(before, after, "vllm:prefix_cache_hits_total")
    assert hits[owner] > 0 and hits[other] == 0, hits
    assert after["localmoe:dp_requests_routed_total"][owner] - before["localmoe:dp_requests_routed_total"][owner] == 4


def test_a_client_that_leaves_aborts_its_request_on_its_replica(server, client):
    model = client.models.list().data[0].id
    body = {"model": model, "prompt": "Go on forever", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    before = per_replica(server.url)
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=auth(), timeout=60) as response:
        lines = response.iter_lines()
        assert any(next(lines).startswith("data: {") for _ in range(4))
    deadline = time.monotonic() + 10
    while sum((after := per_replica(server.url))["vllm:num_requests_running"].values()):
        assert time.monotonic() < deadline, "the replica still runs the request its client left"
        time.sleep(0.05)
    generated = delta(before, after, "vllm:generation_tokens_total")
    assert 0 < sum(generated.values()) < body["max_tokens"]  # stopped by the abort, not by its length


def test_unknown_replica_and_model_admin_are_refused(server):
    assert httpx.get(f"{server.url}/v1/models?replica=7", headers=auth()).status_code == 400
    answer = httpx.post(f"{server.url}/v1/models/unload", json={"model": "x"}, headers=auth())
    assert answer.status_code == 501 and "data parallelism" in answer.json()["error"]["message"]
    assert httpx.post(f"{server.url}/v1/load_lora_adapter", json={}, headers=auth()).status_code == 501


def kill_a_replica_during(server, run: Callable[[int], str], each: int) -> list[str]:
    """`run(i)`'s outcome for `each` requests per replica (the router alternates), started at once; replica 0 is
    killed (SIGKILL) once they all run."""
    with ThreadPoolExecutor(2 * each) as pool:
        futures = [pool.submit(run, i) for i in range(2 * each)]
        deadline = time.monotonic() + 30
        while list(per_replica(server.url)["vllm:num_requests_running"].values()) != [each, each]:
            assert time.monotonic() < deadline, f"the requests did not start, {each} on each replica"
            time.sleep(0.02)
        replicas = [p for p in psutil.Process(server.process.pid).children()
                    if "resource_tracker" not in " ".join(p.cmdline())]
        assert len(replicas) == 2
        os.kill(replicas[0].pid, signal.SIGKILL)
        return [f.result(timeout=60) for f in futures]


def test_a_killed_replica_fails_health_and_its_requests_while_the_other_serves(server, client):
    """Runs last: it leaves the server with one replica."""
    model = client.models.list().data[0].id
    fields = {"max_tokens": 1000, "extra_body": {"ignore_eos": True}}  # long enough to be killed mid-way

    def run(i: int) -> str:
        try:
            if i % 2:
                return complete(client, model, f"plain {i}", **fields).choices[0].finish_reason
            chunks = list(complete(client, model, f"stream {i}", stream=True, **fields))
            return chunks[-1].choices[0].finish_reason
        except openai.APIError as e:
            return f"error: {e}"

    outcomes = kill_a_replica_during(server, run, 2)
    assert sorted(o.startswith("error:") for o in outcomes) == [False, False, True, True], outcomes
    assert outcomes.count("length") == 2
    assert not healthy(server.url)
    assert sorted(per_replica(server.url)["localmoe:dp_replica_up"].values()) == [0, 1]
    assert complete(client, model, "still served", **fields).choices[0].finish_reason == "length"


def test_router_prefers_the_prefix_owner_unless_much_busier():
    router = Router(2)
    shared = prefix_blocks({"prompt": "x" * (3 * PREFIX_BLOCK_CHARS) + "a"})
    assert len(shared) == 3 and prefix_blocks({"prompt": "short"}) == []
    first, reason = router.choose(shared, [0, 1])
    assert reason == "load"
    router.start(first)
    longer = prefix_blocks({"prompt": "x" * (3 * PREFIX_BLOCK_CHARS) + "y" * PREFIX_BLOCK_CHARS})
    assert longer[:3] == shared
    assert router.choose(longer, [0, 1]) == (first, "prefix")  # one request busier: still the owner
    for _ in range(int(AFFINITY_SLACK)):
        router.start(first)
    assert router.choose(longer, [0, 1]) == (1 - first, "load")  # much busier: the prefix moves
    assert router.choose(shared, [first]) == (first, "load")  # the new owner is dead: the live one
    # chat messages and token ids have prefixes too; an unparsable body has none
    chat = prefix_blocks({"messages": [{"role": "system", "content": "s" * PREFIX_BLOCK_CHARS}]})
    assert len(chat) == 1 and len(prefix_blocks({"prompt": list(range(40))})) == 2
    assert prefix_blocks({"prompt": [{"no": "tokens"}]}) == [] and prefix_blocks(None) == []


def test_refusals(monkeypatch, tiny_mixtral_dir):
    with pytest.raises(ConfigError, match="data_parallel_size: one engine is one replica"):
        engine(tiny_mixtral_dir, data_parallel_size=2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1})
    config = load_config(None, {"engine": {"data_parallel_size": 3, "device": "cpu"}})
    with pytest.raises(ConfigError, match="3 replicas need a CPU core each"):
        data_parallel.placements(config, 3)
    assert [p.cpus for p in data_parallel.placements(config, 2)] == [(0,), (1,)]
    with pytest.raises(ConfigError, match="must be positive"):
        data_parallel.data_parallel_size(load_config(None, {"engine": {"data_parallel_size": 0}}))

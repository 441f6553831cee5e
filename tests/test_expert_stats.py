"""Expert statistics through a real server: /v1/stats/experts, /v1/stats/memory, /v1/stats/performance and the
localmoe:expert_* Prometheus metrics (/dashboard, which draws them, has tests/test_dashboard.py)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from checkpoints import make_checkpoint
from server_process import auth
from test_server import running_server

HOT_PROMPT = "a" * 40  # one token over and over: its tokens mostly pick the same experts


@pytest.fixture(scope="module")
def offload_url(tmp_path_factory) -> Iterator[str]:
    """8 experts, 2 slots per layer, read from the checkpoint file on a miss; no prefix caching, so every
    repeat of the hot prompt routes its tokens again."""
    directory = make_checkpoint(tmp_path_factory.mktemp("stats-model"), "mixtral", seed=4, num_local_experts=8)
    with running_server(directory, tmp_path_factory.mktemp("stats-server"), "--expert-cache-size", "2",
                        "--expert-offload-target", "disk", "--expert-prefetch", "--no-enable-prefix-caching") as url:
        for _ in range(6):
            response = httpx.post(f"{url}/v1/completions", headers=auth(), timeout=60, json={
                "model": httpx.get(f"{url}/v1/models", headers=auth()).json()["data"][0]["id"],
                "prompt": HOT_PROMPT, "max_tokens": 4, "temperature": 0})
            assert response.status_code == 200
        yield url


def stats(url: str, what: str) -> dict:
    response = httpx.get(f"{url}/v1/stats/{what}", headers=auth())
    assert response.status_code == 200
    return response.json()


def test_expert_stats_count_tokens_hits_and_misses(offload_url):
    data = stats(offload_url, "experts")
    assert data["offloading"] and len(data["layers"]) == 3
    for layer in data["layers"]:
        assert sum(layer["tokens"]) > 0 and layer["load_imbalance"] >= 1.0
        cache = layer["cache"]
        assert cache["capacity"] == 2 and len(cache["resident_experts"]) <= 2
        assert sum(cache["misses"]) > 0 and cache["bytes_loaded"] == sum(cache["bytes_loaded_per_expert"]) > 0
        assert sum(cache["prefetched_per_expert"]) == cache["prefetched"]
        assert cache["resident_bytes"] <= cache["budget_bytes"]
    # every routed token chose top_k experts; each layer saw the same tokens
    assert len({sum(layer["tokens"]) for layer in data["layers"]}) == 1
    totals = data["totals"]
    assert totals["cache_misses"] > 0 and 0 <= totals["cache_hit_rate"] <= 1
    assert totals["prefetched"] > 0


def test_memory_stats_account_for_every_pool(offload_url):
    data = stats(offload_url, "memory")
    assert data["weights_bytes"] > 0 and data["kv_cache"]["bytes"] > 0
    cache = data["expert_cache"]
    assert cache["enabled"] and cache["offload_target"] == "disk" and cache["experts_per_layer"] == 2
    assert 0 < cache["resident_bytes"] <= cache["budget_bytes"]
    assert cache["store_host_bytes"] == 0  # the disk target keeps no copy in memory
    assert data["process_rss_bytes"] > data["weights_bytes"]


def test_performance_window_summarises_recent_requests(offload_url):
    data = stats(offload_url, "performance")
    assert data["num_requests"] >= 6
    assert data["output_tokens_per_s"] > 0
    assert 0 < data["ttft_s"]["p50"] <= data["ttft_s"]["p99"]
    assert data["tpot_s"]["mean"] > 0


def test_expert_metrics_on_prometheus(offload_url):
    text = httpx.get(f"{offload_url}/metrics", headers=auth()).text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    tokens = {(s.labels["layer"], s.labels["expert"]): s.value for s in samples
              if s.name == "localmoe:expert_tokens_total"}
    assert len(tokens) == 3 * 8 and sum(tokens.values()) > 0
    experts = stats(offload_url, "experts")
    for name, key in (("localmoe:expert_cache_misses_total", "cache_misses"),
                      ("localmoe:expert_bytes_loaded_total", "bytes_loaded")):
        assert sum(s.value for s in samples if s.name == name) == experts["totals"][key] > 0
    assert {s.labels["layer"] for s in samples if s.name == "localmoe:expert_load_imbalance"} == {"0", "1", "2"}


def expert_metrics(url: str) -> dict[str, float]:
    """Each localmoe:expert_* counter summed over layers and experts, and the engine's vllm:* counters."""
    text = httpx.get(f"{url}/metrics", headers=auth()).text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (sample.name.startswith("localmoe:expert_") and sample.name.endswith("_total")) or sample.name in (
                    "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total"):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def test_statistics_read_under_load_are_snapshots_that_add_up(offload_url):
    """Read /v1/stats/experts and /metrics over and over while 8 requests stream: every reading is one moment of
    the engine (every layer has routed the same tokens), counters never go back, and at the end the tokens routed
    are exactly the tokens computed (prompt plus output, less each request's last token, never fed back) times
    top-k in every layer, on both routes."""
    model = httpx.get(f"{offload_url}/v1/models", headers=auth()).json()["data"][0]["id"]

    def complete(seed: int) -> None:
        response = httpx.post(f"{offload_url}/v1/completions", headers=auth(), timeout=120, json={
            "model": model, "prompt": f"request {seed}: " + "tokens " * seed, "max_tokens": 24,
            "ignore_eos": True, "temperature": 1.0, "seed": seed})
        assert response.status_code == 200

    keys = ("tokens_routed", "cache_hits", "cache_misses", "bytes_loaded")
    readings, scrapes = [], []
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(complete, seed) for seed in range(8)]
        while not all(f.done() for f in futures):
            experts = stats(offload_url, "experts")
            assert len({sum(layer["tokens"]) for layer in experts["layers"]}) == 1  # one moment, whole
            readings.append(experts["totals"])
            scrapes.append(expert_metrics(offload_url))
        for f in futures:
            f.result()
    assert len(readings) >= 3
    for earlier, later in zip(readings, readings[1:]):
        assert all(later[key] >= earlier[key] for key in keys)
    for earlier, later in zip(scrapes, scrapes[1:]):
        assert all(later[name] >= value for name, value in earlier.items())

    experts, metrics = stats(offload_url, "experts"), expert_metrics(offload_url)
    layers = experts["layers"]
    computed = (metrics["vllm:prompt_tokens_total"] + metrics["vllm:generation_tokens_total"]
                - metrics["vllm:request_success_total"])
    assert experts["totals"]["tokens_routed"] == len(layers) * layers[0]["top_k"] * computed
    assert metrics["localmoe:expert_tokens_total"] == experts["totals"]["tokens_routed"]
    assert metrics["localmoe:expert_cache_misses_total"] == experts["totals"]["cache_misses"]
    assert metrics["localmoe:expert_cache_hits_total"] == experts["totals"]["cache_hits"]

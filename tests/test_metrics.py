"""The metrics operators already query, through a real server: every series the serving guide's alert rules
(deploy/prometheus/localmoe-rules.yaml, checked by promtool) and vLLM's Grafana dashboard name, vLLM's deprecated
aliases beside the current names, the process_* collector, per-step and per-phase histograms with vLLM's buckets,
http_requests_total, and vLLM's periodic "Avg prompt throughput" log line."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from localmoe.engine.stats import INTER_TOKEN_LATENCY_BUCKETS, ITERATION_TOKENS_BUCKETS, REQUEST_LATENCY_BUCKETS
from server_process import SMALL_KV, ServerProcess, auth, scrape, serve

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy" / "prometheus" / "localmoe-rules.yaml"
GRAFANA_METRICS = Path(__file__).with_name("data") / "vllm_grafana_metrics.txt"
# The serving guide's table of key metrics ("MoE model key monitoring metrics"), less DCGM's GPU exporter series
GUIDE_TABLE = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc",
               "vllm:avg_prompt_throughput_toks_per_s", "vllm:avg_generation_throughput_toks_per_s")
# vLLM's log line (vllm/v1/metrics/loggers.py: LoggingStatLogger.log), with its optional preemptions part
LOG_LINE = re.compile(r"Engine 000: Avg prompt throughput: (?P<prompt>[\d.]+) tokens/s, "
                      r"Avg generation throughput: (?P<generation>[\d.]+) tokens/s, "
                      r"Running: (?P<running>\d+) reqs, Waiting: (?P<waiting>\d+) reqs, (?:Preemptions: \d+, )?"
                      r"GPU KV cache usage: (?P<kv>[\d.]+)%, Prefix cache hit rate: (?P<hit>[\d.]+)%$", re.M)
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset"}


@pytest.fixture(scope="module")
def server(tiny_mixtral_dir: Path, tmp_path_factory) -> Iterator[ServerProcess]:
    """Logs at info, with vLLM's log interval at one second."""
    with serve(tmp_path_factory.mktemp("metrics-server"), "--model", str(tiny_mixtral_dir), "--dtype", "float32",
               *SMALL_KV, "--max-model-len", "512", "--log-level", "info",
               env={"VLLM_LOG_STATS_INTERVAL": "1"}) as process:
        yield process


@pytest.fixture(scope="module")
def model(server: ServerProcess) -> str:
    return httpx.get(f"{server.url}/v1/models", headers=auth()).json()["data"][0]["id"]


def complete(server: ServerProcess, model: str, max_tokens: int, prompt: str = "Metrics please") -> dict:
    response = httpx.post(f"{server.url}/v1/completions", headers=auth(), timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()


def wait_idle(url: str) -> None:
    """Until no request runs or waits (an aborted stream of an earlier test is gone), and the engine loop's own
    statistics have caught up: the engine publishes "idle" at the end of its last step, the loop's histograms just
    after it, so a scrape in between would miss that step."""
    deadline = time.monotonic() + 60
    previous = None
    while True:
        metrics = scrape(url)
        idle = not (metrics["vllm:num_requests_running"] or metrics["vllm:num_requests_waiting"])
        if idle and previous is not None and previous == metrics["vllm:iteration_tokens_total_count"]:
            return
        previous = metrics["vllm:iteration_tokens_total_count"] if idle else None
        assert time.monotonic() < deadline, metrics
        time.sleep(0.1)


def families(url: str) -> dict[str, object]:
    text = httpx.get(f"{url}/metrics", headers=auth()).text
    return {family.name: family for family in text_string_to_metric_families(text)}


def series_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions, keywords, label names
    (inside {} or by/without lists) or durations."""
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = re.findall(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", expr)
    return {name for name in names if name not in PROMQL_WORDS}


def test_series_names_reads_promql() -> None:
    assert series_names('histogram_quantile(0.9, sum by(le) (rate(vllm:a_bucket{model_name="$m"}[5m]))) > 30'
                        ) == {"vllm:a_bucket"}
    assert series_names("rate(x_sum[1m])\n/\nrate(x_count[1m]) and on (job) up") == {"x_sum", "x_count", "up"}


def test_every_series_of_the_guides_alerts_and_vllms_dashboard_is_exported(server: ServerProcess,
                                                                          model: str) -> None:
    complete(server, model, 4)
    rules = yaml.safe_load(RULES.read_text())
    alerted = set().union(*(series_names(rule["expr"]) for group in rules["groups"] for rule in group["rules"]))
    assert alerted == {"vllm:e2e_request_latency_seconds_bucket", "vllm:gpu_cache_usage_perc",
                       "vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:prompt_tokens_total",
                       "vllm:generation_tokens_total", "localmoe:expert_cache_hits_total",
                       "localmoe:expert_cache_misses_total", "localmoe:expert_tokens_total",
                       "localmoe:requests_rejected_total"}
    dashboard = {line for line in GRAFANA_METRICS.read_text().splitlines() if line and not line.startswith("#")}
    assert len(dashboard) > 20
    text = httpx.get(f"{server.url}/metrics", headers=auth()).text
    exported = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    assert not (alerted | dashboard | set(GUIDE_TABLE)) - exported


def test_promtool_checks_the_rules_and_their_tests() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("needs promtool (Debian's prometheus package, installed by .ci/run)")
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0 and "SUCCESS: 7 rules found" in checked.stdout, checked.stdout + checked.stderr
    tested = subprocess.run([promtool, "test", "rules", str(RULES.with_suffix(".test.yaml"))],
                            capture_output=True, text=True)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_gpu_cache_usage_is_kv_cache_usage(server: ServerProcess, model: str) -> None:
    body = {"model": model, "prompt": "Go on", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=auth(), timeout=60) as response:
        lines = response.iter_lines()
        assert [line for line in (next(lines) for _ in range(6)) if line]
        during = scrape(server.url)
    assert during["vllm:kv_cache_usage_perc"] > 0
    assert during["vllm:gpu_cache_usage_perc"] == during["vllm:kv_cache_usage_perc"]


def test_process_and_python_collectors(server: ServerProcess) -> None:
    found = families(server.url)
    metrics = scrape(server.url)
    assert metrics["process_resident_memory_bytes"] > 50 * 2**20  # torch alone holds more
    assert metrics["process_cpu_seconds_total"] > 0
    assert 0 < metrics["process_open_fds"] < metrics["process_max_fds"]
    assert metrics["process_start_time_seconds"] < time.time()
    assert "python_info" in found and "python_gc_objects_collected" in found


def test_iteration_tokens_count_prompts_and_generated_tokens(server: ServerProcess, model: str) -> None:
    """On an idle server, one request of P prompt tokens and N generated ones is N steps (the first also computes
    the prompt) of P + N tokens in all, in vLLM's buckets."""
    wait_idle(server.url)
    before = scrape(server.url)
    result = complete(server, model, 7)
    after = scrape(server.url)
    prompt = result["usage"]["prompt_tokens"]
    assert after["vllm:iteration_tokens_total_count"] - before["vllm:iteration_tokens_total_count"] == 7
    assert after["vllm:iteration_tokens_total_sum"] - before["vllm:iteration_tokens_total_sum"] == prompt + 7
    buckets = [s.labels["le"] for s in families(server.url)["vllm:iteration_tokens_total"].samples
               if s.name.endswith("_bucket")]
    assert buckets == [str(float(b)) for b in ITERATION_TOKENS_BUCKETS] + ["+Inf"]


def bucket_bounds(found: dict[str, object], name: str) -> list[float]:
    return [float(s.labels["le"]) for s in found[name].samples if s.name.endswith("_bucket")][:-1]


def test_request_phases_and_token_latencies_per_request(server: ServerProcess, model: str) -> None:
    wait_idle(server.url)
    before = scrape(server.url)
    complete(server, model, 6)
    after = scrape(server.url)
    grew = {name.removesuffix("_count"): after[name] - before[name] for name in after if name.endswith("_count")}
    for phase in ("queue", "prefill", "decode", "inference"):
        assert grew[f"vllm:request_{phase}_time_seconds"] == 1
    for per_request in ("vllm:e2e_request_latency_seconds", "vllm:time_to_first_token_seconds",
                        "vllm:request_time_per_output_token_seconds", "vllm:request_max_num_generation_tokens"):
        assert grew[per_request] == 1
    assert grew["vllm:inter_token_latency_seconds"] == grew["vllm:time_per_output_token_seconds"] == 5
    assert after["vllm:request_max_num_generation_tokens_sum"] - before["vllm:request_max_num_generation_tokens_sum"] \
        == 6
    inference = after["vllm:request_inference_time_seconds_sum"] - before["vllm:request_inference_time_seconds_sum"]
    e2e = after["vllm:e2e_request_latency_seconds_sum"] - before["vllm:e2e_request_latency_seconds_sum"]
    assert 0 < inference <= e2e
    found = families(server.url)
    assert bucket_bounds(found, "vllm:e2e_request_latency_seconds") == list(REQUEST_LATENCY_BUCKETS)
    assert bucket_bounds(found, "vllm:request_queue_time_seconds") == list(REQUEST_LATENCY_BUCKETS)
    assert bucket_bounds(found, "vllm:inter_token_latency_seconds") == list(INTER_TOKEN_LATENCY_BUCKETS)


def http_requests(url: str) -> dict[tuple[str, str, str], float]:
    return {(s.labels["method"], s.labels["status"], s.labels["handler"]): s.value
            for s in families(url)["http_requests"].samples if s.name == "http_requests_total"}


def test_http_requests_total_counts_answers_by_route_and_status_class(server: ServerProcess, model: str) -> None:
    before = http_requests(server.url)
    complete(server, model, 1)
    refused = httpx.post(f"{server.url}/v1/completions", headers=auth(),
                         json={"model": model, "prompt": "x", "max_tokens": -1})
    assert refused.status_code == 400
    assert httpx.get(f"{server.url}/no/such/route", headers=auth()).status_code == 404
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    after = http_requests(server.url)
    for key in (("POST", "2xx", "/v1/completions"), ("POST", "4xx", "/v1/completions")):
        assert after[key] - before.get(key, 0) == 1, key
    # no route answered the unknown path, nor the request the API key check refused
    assert after[("GET", "4xx", "none")] - before.get(("GET", "4xx", "none"), 0) == 2


def test_vllms_log_line_reports_throughput_and_the_queue(server: ServerProcess, model: str) -> None:
    """Every VLLM_LOG_STATS_INTERVAL seconds while busy, the engine logs vLLM's line, in vLLM's words."""
    deadline = time.monotonic() + 120
    while True:
        complete(server, model, 16)
        busy = [m for m in LOG_LINE.finditer(server.log()) if float(m["generation"]) > 0]
        if busy:
            break
        assert time.monotonic() < deadline, server.log()
    line = busy[-1]
    assert int(line["running"]) + int(line["waiting"]) <= 1
    assert 0 <= float(line["kv"]) <= 100 and 0 <= float(line["hit"]) <= 100


def test_disable_log_stats_keeps_the_line_out_of_the_log(tiny_mixtral_dir: Path, caplog) -> None:
    """--disable-log-stats: the interval passes and nothing is logged; without it the same tick logs the line."""
    from localmoe import LLM
    from localmoe.engine.stats import LoopStats

    engine = LLM(model=str(tiny_mixtral_dir), dtype="float32", kv_cache_memory="16MiB").engine
    caplog.set_level(logging.DEBUG, logger="localmoe.engine.stats")
    for log_lines in (False, True):
        caplog.clear()
        LoopStats(engine, log_interval_s=0.0, log_lines=log_lines).tick()
        assert bool(LOG_LINE.search(caplog.text)) == log_lines

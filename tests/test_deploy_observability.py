"""The Grafana dashboard and the alert rules against a real Prometheus (Debian's `prometheus`, started here on
127.0.0.1) scraping a real `localmoe serve` (the built-in model, with expert offloading, a small KV cache and a
short batch and a short waiting queue) under load: every expression of every dashboard panel and of every alert
returns data through Prometheus's query API, the shipped rules evaluate without error, and the KV-cache, queue and
rejection alerts fire once the load fills the cache, builds a queue and overflows it (503 on the OpenAI routes, 429
on TGI's), their thresholds and durations lowered by templating the numbers only: the expressions stay
byte-identical to the shipped ones."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from server_process import API_KEY, ServerProcess, auth, free_port, healthy, serve

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "localmoe-dashboard.json"
RULES = REPO / "deploy" / "prometheus" / "localmoe-rules.yaml"
RATE_INTERVAL = "30s"  # Grafana's $__rate_interval, for a 1 s scrape
# (alert, shipped threshold, lowered threshold, lowered for:) for the alerts this test's load sets off
LOWERED = {"MoEModelKVCacheFull": ("0.95", "0.3", "5s"), "MoEModelQueueBacklog": ("100", "2", "5s"),
           "LocalMoERequestsRejected": ("0", "0", "5s")}
REFUSED_PAUSE = 0.2  # seconds a refused client waits before it tries again
DEADLINE = 120  # seconds, only against a hang


def lowered_rules() -> str:
    """The shipped rules with LOWERED's numbers in place of theirs; everything else byte for byte."""
    text = RULES.read_text()
    for alert, (threshold, low, duration) in LOWERED.items():
        pattern = re.compile(rf"(- alert: {alert}\n\s+expr: [^\n]*> ){re.escape(threshold)}(\n\s+for: )\w+")
        text, count = pattern.subn(rf"\g<1>{low}\g<2>{duration}", text)
        assert count == 1, alert
    return text


def test_lowering_changes_only_the_numbers() -> None:
    shipped, lowered = yaml.safe_load(RULES.read_text()), yaml.safe_load(lowered_rules())
    for group, low_group in zip(shipped["groups"], lowered["groups"]):
        for rule, low in zip(group["rules"], low_group["rules"]):
            if rule["alert"] in LOWERED:
                threshold, value, duration = LOWERED[rule["alert"]]
                assert low["expr"] == rule["expr"].replace(f"> {threshold}", f"> {value}") and low["for"] == duration
            else:
                assert low == rule


class Load:
    """Clients streaming long completions back to back (more of them than --max-num-seqs and --max-waiting-requests:
    a queue builds and overflows), each followed by a request without the key (a 401: the HTTP error panel's 4xx),
    and one client on TGI's /generate (refused with 429 while the queue is full)."""

    def __init__(self, url: str, model: str, clients: int) -> None:
        self.url, self.model, self.stop = url, model, threading.Event()
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(clients)]
        self.threads.append(threading.Thread(target=self.tgi_client, daemon=True))

    def client(self) -> None:
        body = {"model": self.model, "prompt": "Tell me a long story about experts", "max_tokens": 56,
                "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=300) as http:
            while not self.stop.is_set():
                with http.stream("POST", f"{self.url}/v1/completions", headers=auth(), json=body) as response:
                    for _ in response.iter_lines():
                        if self.stop.is_set():  # closing the stream aborts the request: no wait at the end
                            break
                http.get(f"{self.url}/v1/models")
                if response.status_code != 200:
                    self.stop.wait(REFUSED_PAUSE)

    def tgi_client(self) -> None:
        body = {"inputs": "Tell me a story", "parameters": {"max_new_tokens": 8}}
        with httpx.Client(timeout=300) as http:
            while not self.stop.is_set():
                if http.post(f"{self.url}/generate", headers=auth(), json=body).status_code != 200:
                    self.stop.wait(REFUSED_PAUSE)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=300)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    """16 KV blocks, 4 sequences of up to 64 tokens (4 blocks) at once: the load fills the cache and preempts; 4
    more wait, the others are refused."""
    with serve(tmp_path_factory.mktemp("observed-server"), "--kv-cache-memory", str(512 * 2**10), "--max-num-seqs",
               "4", "--max-waiting-requests", "4", "--max-model-len", "128", "--expert-cache-size", "4") as process:
        yield process


@pytest.fixture(scope="module")
def prometheus(server: ServerProcess, tmp_path_factory) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("needs prometheus (Debian's prometheus package, installed by .ci/run)")
    directory = tmp_path_factory.mktemp("prometheus")
    (directory / "rules.yaml").write_text(lowered_rules())
    (directory / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(directory / "rules.yaml")],
        "scrape_configs": [{"job_name": "localmoe", "metrics_path": "/metrics",
                            "authorization": {"type": "Bearer", "credentials": API_KEY},
                            "static_configs": [{"targets": [server.url.removeprefix("http://")]}]}]}))
    port = free_port()
    log = (directory / "prometheus.log").open("w")
    process = subprocess.Popen([binary, f"--config.file={directory / 'prometheus.yml'}",
                                f"--storage.tsdb.path={directory / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: healthy(url, "/-/ready"), process, directory / "prometheus.log")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


def wait_for(condition, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.5)


def query(url: str, expr: str) -> list[dict]:
    answer = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=30).json()
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def panel_exprs(model: str) -> dict[str, str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {f"{p['title']} / {t['refId']}": t["expr"].replace("$model_name", model).replace("$__rate_interval",
                                                                                           RATE_INTERVAL)
            for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]}


def alert_operands() -> dict[str, str]:
    """Each alert's expression cut at its set operators and comparisons: the parts that must return data for the
    alert to mean anything (the comparisons themselves return nothing while all is well)."""
    operands = {}
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            for i, part in enumerate(re.split(r"\n\s*(?:unless|and|or)\n", rule["expr"])):
                operands[f"{rule['alert']} / {i}"] = re.sub(r"\s*(?:>|<|==|>=|<=)\s*[\d.]+\s*$", "", part.strip())
    return operands


def test_every_panel_and_alert_expression_returns_data_and_the_alerts_fire(server: ServerProcess,
                                                                           prometheus: str) -> None:
    model = httpx.get(f"{server.url}/v1/models", headers=auth()).json()["data"][0]["id"]
    exprs = {**panel_exprs(model), **alert_operands()}
    assert len(exprs) > 30
    with Load(server.url, model, clients=10):
        # 10 s of samples under load, requests finishing within the last rate() window, a queue
        wait_for(lambda: query(prometheus, "count_over_time(vllm:num_requests_running[1m]) >= 10")
                 and query(prometheus, f"increase(vllm:e2e_request_latency_seconds_count[{RATE_INTERVAL}]) > 0")
                 and query(prometheus, "max_over_time(vllm:num_requests_waiting[1m]) > 2"),
                 server.process, server.log_path)
        firing: set[str] = set()
        refused: set[str] = set()  # the statuses the rejection alert fired for

        def fired() -> bool:
            alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=30).json()["data"]["alerts"]
            firing.update(a["labels"]["alertname"] for a in alerts if a["state"] == "firing")
            refused.update(a["labels"]["status"] for a in alerts
                           if a["state"] == "firing" and a["labels"]["alertname"] == "LocalMoERequestsRejected")
            return set(LOWERED) <= firing and refused == {"503", "429"}
        wait_for(fired, server.process, server.log_path)
        empty = {name: exprs[name] for name, expr in exprs.items() if not query(prometheus, expr)}
        assert not empty, "\n".join(f"{name}: {expr}" for name, expr in empty.items())
    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=30).json()["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == 7 and all(rule["health"] == "ok" for rule in rules), rules
    assert not firing - set(LOWERED), "the others stay silent under a short, healthy load"


def test_dashboard_panels_do_not_overlap_and_read_one_data_source() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    boxes = [(p["title"], p["gridPos"]) for p in dashboard["panels"]]
    for i, (a_title, a) in enumerate(boxes):
        for b_title, b in boxes[i + 1:]:
            assert not (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"]
                        and b["y"] < a["y"] + a["h"]), (a_title, b_title)
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert {p["datasource"]["uid"] for p in panels} == {"${DS_PROMETHEUS}"}
    titles = {p["title"] for p in panels}
    assert {"Token throughput", "Time to first token (TTFT)", "Time per output token (TPOT)", "E2E request latency",
            "Scheduler state", "KV cache usage", "Preemptions", "Tokens per expert", "Expert cache hit rate",
            "Expert bytes loaded", "Expert load imbalance (max / mean tokens per expert)"} <= titles

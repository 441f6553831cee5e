"""Prometheus metrics under vLLM's names, so existing vLLM dashboards and alerts work unchanged.

Gauges and counters kept by the engine are read from its latest stats snapshot (engine/stats.py) when Prometheus
scrapes, and so are the histograms only the engine loop can observe (tokens per step, inter-token latency, the
phases of a request); per-request histograms are observed by the server as requests finish. The registry also
carries what every Prometheus client exports by default (process_*, python_*), and http_requests_total as vLLM's
prometheus-fastapi-instrumentator counts it, so error-rate queries written for vLLM work here too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from http import HTTPStatus
from typing import Any

from prometheus_client import (
    GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry, Counter, Histogram,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from localmoe.engine.stats import INTER_TOKEN_LATENCY_BUCKETS, REQUEST_LATENCY_BUCKETS, LoopSnapshot, SpecDecodeStats
from localmoe.outputs import RequestOutput
from localmoe.server.stats import PerformanceWindow

# a full waiting queue's answer: 503 with Retry-After (OpenAI routes), 429 "overloaded" (TGI's routes)
REJECTION_STATUSES = (HTTPStatus.SERVICE_UNAVAILABLE, HTTPStatus.TOO_MANY_REQUESTS)
MODEL_LABELS = ["model_name", "version"]  # on every series of a model: its served name, and which version of it
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)

# (metric name, EngineStats field, help) for values the engine owns.
ENGINE_GAUGES = (
    ("vllm:num_requests_running", "num_running", "Number of requests in model execution batches."),
    ("vllm:num_requests_waiting", "num_waiting", "Number of requests waiting to be processed."),
    ("vllm:kv_cache_usage_perc", "kv_cache_usage", "KV-cache usage. 1 means 100 percent usage."),
    ("vllm:gpu_cache_usage_perc", "kv_cache_usage",
     "KV-cache usage. 1 means 100 percent usage. vLLM's name until v0.10, which its guides' alerts still use: "
     "the same value as vllm:kv_cache_usage_perc."),
)
ENGINE_COUNTERS = (
    ("vllm:prompt_tokens", "prompt_tokens_total", "Number of prefill tokens processed."),
    ("vllm:generation_tokens", "generation_tokens_total", "Number of generation tokens processed."),
    ("vllm:prefix_cache_queries", "prefix_cache_queries", "Prefix cache queries, in tokens."),
    ("vllm:prefix_cache_hits", "prefix_cache_hits", "Prefix cache hits, in tokens."),
    ("vllm:num_preemptions", "num_preemptions_total", "Cumulative number of preemptions."),
    ("localmoe:num_swapped_out", "num_swapped_out_total", "Preemptions that swapped KV blocks to host memory."),
    ("localmoe:num_prefill_chunks", "num_prefill_chunks_total",
     "Prompt pieces computed in a step that did not finish the prompt (chunked prefill)."),
)
# (metric name, SpecDecodeStats field, help), exported for models that speculate
SPEC_DECODE_COUNTERS = (
    ("vllm:spec_decode_num_drafts", "num_drafts", "Number of spec decoding drafts."),
    ("vllm:spec_decode_num_draft_tokens", "num_draft_tokens", "Number of draft tokens."),
    ("vllm:spec_decode_num_accepted_tokens", "num_accepted_tokens", "Number of accepted tokens."),
)
# (metric name, LoopSnapshot field, help): vllm:time_per_output_token_seconds is vLLM's older name for the
# inter-token latency, kept because its dashboards and guides still query it.
LOOP_HISTOGRAMS = (
    ("vllm:iteration_tokens_total", "iteration_tokens", "Histogram of number of tokens per engine_step."),
    ("vllm:inter_token_latency_seconds", "inter_token_latency", "Histogram of inter-token latency in seconds."),
    ("vllm:time_per_output_token_seconds", "inter_token_latency",
     "Histogram of time per output token in seconds (vLLM's older name for vllm:inter_token_latency_seconds)."),
    ("vllm:request_queue_time_seconds", "queue_time", "Histogram of time spent in WAITING phase for request."),
    ("vllm:request_prefill_time_seconds", "prefill_time", "Histogram of time spent in PREFILL phase for request."),
    ("vllm:request_decode_time_seconds", "decode_time", "Histogram of time spent in DECODE phase for request."),
    ("vllm:request_inference_time_seconds", "inference_time",
     "Histogram of time spent in RUNNING phase for request."),
)
# vLLM v0's gauges of the numbers its log line prints, which the serving guides still list
LOOP_GAUGES = (
    ("vllm:avg_prompt_throughput_toks_per_s", "prompt_throughput",
     "Average prefill throughput in tokens/s over the last log interval."),
    ("vllm:avg_generation_throughput_toks_per_s", "generation_throughput",
     "Average generation throughput in tokens/s over the last log interval."),
)


def token_buckets(max_model_len: int) -> list[float]:
    """1-2-5 buckets up to max_model_len, as vLLM builds them for token-count histograms."""
    buckets: list[float] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * scale
            if value > max_model_len:
                return buckets
            buckets.append(value)
        scale *= 10


class EngineStatsCollector(Collector):
    """Turns each served model's engine stats snapshot, and its engine loop's (LoopSnapshot), into gauge, counter
    and histogram families at scrape time, one series per model version."""

    def __init__(self, models: dict[tuple[str, str], "ModelMetrics"]) -> None:
        self.models = models  # the live registry of served models (ServerMetrics.models)

    def collect(self) -> Iterator[Metric]:
        read = [(model.labels, model.read_stats(), model.read_loop()) for model in self.models.values()]
        for kind, source, table in ((GaugeMetricFamily, 1, ENGINE_GAUGES), (CounterMetricFamily, 1, ENGINE_COUNTERS),
                                    (GaugeMetricFamily, 2, LOOP_GAUGES)):
            for metric, attr, doc in table:
                family = kind(metric, doc, labels=MODEL_LABELS)
                for row in read:
                    if row[source] is not None:
                        family.add_metric(row[0], float(getattr(row[source], attr)))
                yield family
        for metric, attr, doc in LOOP_HISTOGRAMS:
            family = HistogramMetricFamily(metric, doc, labels=MODEL_LABELS)
            for labels, _, loop in read:
                if loop is not None:
                    histogram = getattr(loop, attr)
                    bounds = [floatToGoString(b) for b in (*histogram.bounds, float("inf"))]
                    family.add_metric(labels, list(zip(bounds, map(float, histogram.cumulative))), histogram.total)
            yield family
        yield from self._spec_decode([(row[0], row[1].spec_decode) for row in read
                                      if row[1] is not None and row[1].spec_decode is not None])
        admitted = GaugeMetricFamily(
            "localmoe:num_sequences_admitted",
            "Sequences (prompts x n) holding a place in the bound max_num_seqs + max_waiting_requests.",
            labels=MODEL_LABELS)
        for model in self.models.values():
            admitted.add_metric(model.labels, float(model.read_admitted()))
        yield admitted


    @staticmethod
    def _spec_decode(read: list[tuple[list[str], SpecDecodeStats]]) -> Iterator[Metric]:
        for metric, attr, doc in SPEC_DECODE_COUNTERS:
            family = CounterMetricFamily(metric, doc, labels=MODEL_LABELS)
            for labels, stats in read:
                family.add_metric(labels, float(getattr(stats, attr)))
            yield family
        per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                      "Accepted tokens per draft position.", labels=[*MODEL_LABELS, "position"])
        for labels, stats in read:
            for position, count in enumerate(stats.num_accepted_tokens_per_pos):
                per_pos.add_metric([*labels, str(position)], float(count))
        yield per_pos


class ExpertStatsCollector(Collector):
    """LocalMoE's expert metrics from each served model's expert statistics (experts/stats.py) at scrape time:
    tokens per (layer, expert), and per layer the load imbalance and, with offloading, cache hits, misses, bytes
    loaded."""

    def __init__(self, models: dict[tuple[str, str], "ModelMetrics"]) -> None:
        self.models = models

    def collect(self) -> Iterator[Metric]:
        tokens = CounterMetricFamily("localmoe:expert_tokens", "Tokens routed to each expert of each MoE layer.",
                                     labels=[*MODEL_LABELS, "layer", "expert"])
        imbalance = GaugeMetricFamily("localmoe:expert_load_imbalance",
                                      "Max over mean tokens per expert of a MoE layer (1 is even).",
                                      labels=[*MODEL_LABELS, "layer"])
        cache = {key: CounterMetricFamily(f"localmoe:{metric}", doc, labels=[*MODEL_LABELS, "layer"])
                 for key, metric, doc in (
                     ("hits", "expert_cache_hits", "Experts a step wanted that were already in the expert cache."),
                     ("misses", "expert_cache_misses", "Experts a step wanted that had to be loaded."),
                     ("bytes_loaded", "expert_bytes_loaded", "Bytes of expert weights loaded into the cache."))}
        for model in self.models.values():
            for layer in model.read_expert_stats()["layers"]:
                index = str(layer["layer"])
                for expert, count in enumerate(layer["tokens"]):
                    tokens.add_metric([*model.labels, index, str(expert)], float(count))
                imbalance.add_metric([*model.labels, index], layer["load_imbalance"])
                stats = layer["cache"] or {"hits": [0], "misses": [0], "bytes_loaded": 0}
                for key, family in cache.items():
                    value = stats[key]
                    family.add_metric([*model.labels, index], float(sum(value) if isinstance(value, list) else value))
        yield from (tokens, imbalance, *cache.values())


class ServerMetrics:
    """One registry per app, so several apps (or tests) never share or clash over metrics; each model the app
    serves adds its series under its own model_name label (add_model), as vLLM labels its own, and the version of
    that name it is (server/canary.py)."""

    def __init__(self, max_model_len: int) -> None:
        """`max_model_len`: the largest context of the models served, which bounds the token-count buckets."""
        self.registry = CollectorRegistry()
        for default in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):  # what the global registry carries
            self.registry.register(default)
        self.models: dict[tuple[str, str], ModelMetrics] = {}
        self.registry.register(EngineStatsCollector(self.models))
        self.registry.register(ExpertStatsCollector(self.models))
        labels = MODEL_LABELS
        self.requests_rejected = Counter(
            "localmoe:requests_rejected", "Requests refused because the waiting queue was full, by the status "
            "answered: 503 on the OpenAI routes, 429 on TGI's (its 'overloaded').", labels + ["status"],
            registry=self.registry)
        self.request_success = Counter(
            "vllm:request_success", "Count of successfully processed requests.",
            labels + ["finished_reason"], registry=self.registry)
        self.http_requests = Counter(
            "http_requests_total", "Total number of requests by method, status and handler.",
            ["method", "status", "handler"], registry=self.registry)
        self.time_to_first_token = Histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
            labels, buckets=TTFT_BUCKETS, registry=self.registry)
        self.request_time_per_output_token = Histogram(
            "vllm:request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds per request.",
            labels, buckets=INTER_TOKEN_LATENCY_BUCKETS, registry=self.registry)
        self.e2e_request_latency = Histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
            labels, buckets=REQUEST_LATENCY_BUCKETS, registry=self.registry)
        self.request_prompt_tokens = Histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.",
            labels, buckets=token_buckets(max_model_len), registry=self.registry)
        self.request_generation_tokens = Histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.",
            labels, buckets=token_buckets(max_model_len), registry=self.registry)
        self.request_max_num_generation_tokens = Histogram(
            "vllm:request_max_num_generation_tokens", "Histogram of maximum number of requested generation tokens.",
            labels, buckets=token_buckets(max_model_len), registry=self.registry)

    def add_model(self, model_name: str, version: str, read_stats: Callable[[], Any],
                  read_expert_stats: Callable[[], dict], read_admitted: Callable[[], int],
                  read_loop: Callable[[], LoopSnapshot | None]) -> "ModelMetrics":
        model = ModelMetrics(self, model_name, version, read_stats, read_expert_stats, read_admitted, read_loop)
        self.models[model_name, version] = model
        for status in REJECTION_STATUSES:  # exported at 0 from the start, so rate() and alerts see the first one
            self.requests_rejected.labels(*model.labels, str(status.value))
        return model

    def remove_model(self, model: "ModelMetrics") -> None:
        """Its engine's series go (its request counters and histograms stay, as counts of what it served); a
        switch that put another engine under the same labels already replaced it."""
        if self.models.get((model.model_name, model.version)) is model:
            del self.models[model.model_name, model.version]

    def errors(self) -> dict[str, float]:
        """Responses with a client (4xx) or server (5xx, 503s included) error so far, on any route."""
        totals = {"4xx": 0.0, "5xx": 0.0}
        for sample in self.http_requests.collect()[0].samples:
            if sample.name.endswith("_total") and sample.labels["status"] in totals:
                totals[sample.labels["status"]] += sample.value
        return totals


class ModelMetrics:
    """One served model's part of the server's metrics: what its engine publishes, read at scrape time, and the
    requests it finished, observed under its model_name."""

    def __init__(self, server: ServerMetrics, model_name: str, version: str, read_stats: Callable[[], Any],
                 read_expert_stats: Callable[[], dict], read_admitted: Callable[[], int],
                 read_loop: Callable[[], LoopSnapshot | None]) -> None:
        self.server = server
        self.model_name, self.version = model_name, version
        self.labels = [model_name, version]
        self.read_stats, self.read_expert_stats = read_stats, read_expert_stats
        self.read_admitted, self.read_loop = read_admitted, read_loop
        self.requests_rejected = server.requests_rejected
        self.recent = PerformanceWindow()  # /v1/stats/performance

    def observe_finished(self, output: RequestOutput) -> None:
        """Record one finished request (all of its n completions) from its last RequestOutput."""
        self.recent.observe(output)
        server, name = self.server, self.labels
        generated = sum(len(c.token_ids) for c in output.outputs)
        for completion in output.outputs:
            server.request_success.labels(*name, completion.finish_reason or "abort").inc()
        server.request_prompt_tokens.labels(*name).observe(len(output.prompt_token_ids))
        server.request_generation_tokens.labels(*name).observe(generated)
        times = output.metrics
        arrival, first, finished = (times.get(k) for k in ("arrival_time", "first_token_time", "finished_time"))
        if arrival is not None and finished is not None:
            server.e2e_request_latency.labels(*name).observe(finished - arrival)
        if arrival is not None and first is not None:
            server.time_to_first_token.labels(*name).observe(first - arrival)
        steps = max(len(c.token_ids) for c in output.outputs)  # n completions decode side by side
        server.request_max_num_generation_tokens.labels(*name).observe(steps)
        if first is not None and finished is not None:  # as vLLM: 0 for a request of one token
            server.request_time_per_output_token.labels(*name).observe((finished - first) / max(steps - 1, 1))

    def totals(self) -> dict[str, float]:
        """Requests this model finished, and responses with a client (4xx) or server (5xx) error on any route."""
        requests = sum(sample.value for sample in self.server.request_success.collect()[0].samples
                       if sample.name.endswith("_total")
                       and [sample.labels["model_name"], sample.labels["version"]] == self.labels)
        return {"requests": requests, **self.server.errors()}


class HTTPMetricsMiddleware:
    """Counts every response in http_requests_total by route template, method and status class ("2xx", "5xx"), as
    vLLM's prometheus-fastapi-instrumentator does (a path no route matched is handler "none")."""

    def __init__(self, app: ASGIApp, counter: Counter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client sees should the app fail before it answers

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            route = scope.get("route")
            handler = getattr(route, "path", "none")
            self.counter.labels(scope["method"], f"{status // 100}xx", handler).inc()

"""Disconnect load: clients that hang up mid-stream must leave nothing behind.

    python benchmarks/disconnect_load.py                 # starts `localmoe serve` on the built-in model
    python benchmarks/disconnect_load.py --url http://127.0.0.1:8000 --api-key KEY   # or uses a running one

After --warmup streamed requests it samples the server's resident set size, then sends --requests
streaming completions (--prompt-len random token ids, --max-tokens tokens with EOS ignored) at
--concurrency, where a seeded --disconnect-fraction of the clients hang up at a random token after
their first. Once all clients are done it polls /metrics until no request runs or waits and the KV
cache is empty and no sequence holds an admission place, and samples the RSS again. It passes when that drain takes at most --max-drain-s and
the RSS grew by less than --max-rss-growth-mb. Writes JSON (default results/disconnect_load.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from serve_bench import running

IDLE_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
               "localmoe:num_sequences_admitted")
MB = 1024 * 1024


@dataclass
class Client:
    prompt: list[int]
    hang_up_after: int | None  # text chunks to read before disconnecting; None: read to the end


@dataclass
class Outcome:
    status: str  # "completed", "disconnected", or what went wrong: "HTTP 503", "ReadError", ...
    output_tokens: int = 0


async def stream_one(client: httpx.AsyncClient, url: str, max_tokens: int, c: Client) -> Outcome:
    body = {"prompt": c.prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    chunks, usage = 0, 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return Outcome(f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    return Outcome(f"stream error {data['error'].get('code')}")
                if data.get("choices"):
                    chunks += 1
                    if c.hang_up_after is not None and chunks >= c.hang_up_after:
                        return Outcome("disconnected", chunks)  # leaving the block closes the connection
                if data.get("usage"):
                    usage = data["usage"]["completion_tokens"]
    except httpx.HTTPError as error:
        return Outcome(type(error).__name__)
    return Outcome("completed", usage or chunks)


async def run_clients(url: str, headers: dict[str, str], clients: list[Client], max_tokens: int,
                      concurrency: int) -> tuple[list[Outcome], float]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(None),
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def limited(c: Client) -> Outcome:
            async with limit:
                return await stream_one(client, url, max_tokens, c)

        start = time.perf_counter()
        outcomes = await asyncio.gather(*(limited(c) for c in clients))
        return outcomes, time.perf_counter() - start


def make_clients(pool: list[int], count: int, prompt_len: int, max_tokens: int, disconnect_fraction: float,
                 rng: np.random.Generator) -> list[Client]:
    """Prompts drawn from `pool` (valid token ids); the hang-ups pick a chunk after the first to stop at."""
    hang_ups = set(rng.choice(count, size=round(count * disconnect_fraction), replace=False).tolist())
    return [Client(rng.choice(pool, size=prompt_len).tolist(),
                   int(rng.integers(1, max_tokens)) if i in hang_ups else None) for i in range(count)]


def token_pool(url: str, headers: dict[str, str], rng: np.random.Generator) -> list[int]:
    """Token ids the served tokenizer really has: those of some random lowercase text."""
    text = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz "), size=2048))
    response = httpx.post(f"{url}/tokenize", json={"prompt": text, "add_special_tokens": False},
                          headers=headers, timeout=30)
    response.raise_for_status()
    return sorted(set(response.json()["tokens"]))


def gauges(url: str, headers: dict[str, str]) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    found: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in IDLE_GAUGES:
                found[sample.name] += sample.value
    return {name: found[name] for name in IDLE_GAUGES}


def wait_until_idle(url: str, headers: dict[str, str], timeout: float) -> tuple[float | None, dict[str, float]]:
    """Seconds until every idle gauge reads 0 (None if they never did within `timeout`), and their last values."""
    start = time.perf_counter()
    while True:
        values = gauges(url, headers)
        elapsed = time.perf_counter() - start
        if not any(values.values()):
            return elapsed, values
        if elapsed > timeout:
            return None, values
        time.sleep(0.05)


def rss_bytes(url: str, headers: dict[str, str]) -> int:
    """The server process's resident set size, as its own /v1/stats/memory reads it from /proc."""
    return httpx.get(f"{url}/v1/stats/memory", headers=headers, timeout=30).json()["process_rss_bytes"]


@contextmanager
def served(args: argparse.Namespace) -> Iterator[str]:
    """The URL to load: --url as given, or a `localmoe serve` started here (default settings) and stopped after."""
    if args.url:
        yield args.url.rstrip("/")
        return
    url = f"http://127.0.0.1:{args.port}"
    command = f"{sys.executable} -m localmoe.cli serve --host 127.0.0.1 --port {args.port} --log-level warning"
    with tempfile.TemporaryDirectory(prefix="disconnect_load-") as log_dir, \
            running("localmoe", url, command, Path(log_dir), args.startup_timeout):
        yield url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server; without it one is started on --port")
    parser.add_argument("--port", type=int, default=8198)
    parser.add_argument("--api-key", default=os.environ.get("LOCALMOE_API_KEY"), help="the --url server's key")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--disconnect-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-drain-s", type=float, default=5.0)
    parser.add_argument("--max-rss-growth-mb", type=float, default=50.0)
    parser.add_argument("--startup-timeout", type=float, default=300)
    parser.add_argument("--out", default="results/disconnect_load.json")
    args = parser.parse_args()

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rng = np.random.default_rng(args.seed)
    with served(args) as url:
        pool = token_pool(url, headers, rng)
        warmup = make_clients(pool, args.warmup, args.prompt_len, args.max_tokens, 0.0, rng)
        asyncio.run(run_clients(url, headers, warmup, args.max_tokens, args.concurrency))
        wait_until_idle(url, headers, timeout=60)
        rss_warm = rss_bytes(url, headers)

        clients = make_clients(pool, args.requests, args.prompt_len, args.max_tokens, args.disconnect_fraction, rng)
        outcomes, duration = asyncio.run(run_clients(url, headers, clients, args.max_tokens, args.concurrency))
        drain_s, last_gauges = wait_until_idle(url, headers, timeout=max(60.0, 2 * args.max_drain_s))
        rss_end = rss_bytes(url, headers)

    statuses = Counter(o.status for o in outcomes)
    completed = statuses.pop("completed", 0)
    disconnected = statuses.pop("disconnected", 0)
    growth_mb = (rss_end - rss_warm) / MB
    report = {
        "load": {k: getattr(args, k) for k in ("warmup", "requests", "concurrency", "prompt_len", "max_tokens",
                                               "disconnect_fraction", "seed")},
        "server": args.url or "localmoe serve (built-in model, default settings)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "completed": completed,
        "disconnected": disconnected,
        "errors": dict(statuses),
        "duration_s": duration,
        "request_throughput": (completed + disconnected) / duration,
        "output_throughput": sum(o.output_tokens for o in outcomes) / duration,  # tokens/s received
        "drain_s": drain_s,
        "gauges_after_drain": last_gauges,
        "rss_after_warmup_mb": rss_warm / MB,
        "rss_end_mb": rss_end / MB,
        "rss_growth_mb": growth_mb,
        "pass": {"drain": drain_s is not None and drain_s <= args.max_drain_s,
                 "rss_growth": growth_mb < args.max_rss_growth_mb},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    drain = f"{drain_s:.2f} s" if drain_s is not None else f"not within {max(60.0, 2 * args.max_drain_s):.0f} s"
    print(f"{completed} completed, {disconnected} disconnected, errors {dict(statuses) or 'none'} in {duration:.1f} s "
          f"({report['output_throughput']:.0f} output tok/s)")
    print(f"drain: {drain} [{'pass' if report['pass']['drain'] else 'FAIL'}]; RSS {rss_warm / MB:.0f} -> "
          f"{rss_end / MB:.0f} MB ({growth_mb:+.1f} MB) [{'pass' if report['pass']['rss_growth'] else 'FAIL'}]")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

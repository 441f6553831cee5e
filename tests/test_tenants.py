"""Tenants: API keys from a file with roles, limits and priorities; 429 with Retry-After at each limit; usage per key;
limits shared by two server processes through one real redis-server."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import redis
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from localmoe import cli
from localmoe.config import ConfigError, load_config
from localmoe.server.rate_limits import KeyMetrics, RateLimiter
from localmoe.server.redis_counters import RedisCounters
from localmoe.server.tenants import APIKey, Limits, digest
from localmoe.server.usage_counters import LocalCounters, Refusal, Window, refusal, usage_summary
from server_process import SMALL_KV, auth, free_port, serve
from test_server import occupied, wait_for_waiting

KEYS = {"ops": "sk-ops", "rpm": "sk-rpm", "solo": "sk-solo", "tpm": "sk-tpm", "bulk": "sk-bulk",
        "interactive": "sk-interactive", "shared": "sk-shared"}
KEYS_FILE = """\
keys:
  - {name: ops, key: sk-ops, role: admin}
  - {name: rpm, key: sk-rpm, requests_per_minute: 3}
  - {name: solo, key: sk-solo, max_concurrent_requests: 1}
  - {name: tpm, key: sk-tpm, tokens_per_minute: 30}
  - {name: bulk, key: sk-bulk, priority: 10}
  - {name: interactive, key_env: INTERACTIVE_KEY, priority: 1}
  - {name: shared, key: sk-shared, requests_per_minute: 4}
"""
SETTINGS = ("--dtype", "float32", *SMALL_KV, "--max-model-len", "4096", "--max-num-seqs", "1")


def client(url: str, name: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS[name], max_retries=0)


def complete(url: str, name: str, max_tokens: int = 1, **extra) -> openai.types.Completion:
    return client(url, name).completions.create(model="m", prompt="Hello", max_tokens=max_tokens,
                                                extra_body={"ignore_eos": True, **extra})


def key_series(url: str) -> dict[tuple[str, ...], float]:
    """localmoe:api_key_* samples by (name, key_name[, limit])."""
    text = httpx.get(f"{url}/metrics", headers=auth()).text
    assert not any(secret in text for secret in KEYS.values())  # names only, never a secret
    return {(s.name, *s.labels.values()): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name.startswith("localmoe:api_key_") and s.name.endswith("_total")}


def usage(url: str) -> dict:
    answer = httpx.get(f"{url}/v1/stats/usage", headers={"Authorization": f"Bearer {KEYS['ops']}"})
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    path.write_text(KEYS_FILE)
    return path


ENV = {"INTERACTIVE_KEY": KEYS["interactive"]}


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A real redis-server on a free port, in the foreground, with nothing written to disk."""
    executable = shutil.which("redis-server")
    assert executable is not None, "redis-server is not installed (.ci/run installs Debian's)"
    port = free_port()
    process = subprocess.Popen([executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(tmp_path_factory.mktemp("redis"))],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def servers(tiny_mixtral_dir: Path, keys_file: Path, redis_url: str, tmp_path_factory) -> Iterator[list[str]]:
    """Two servers counting in one Redis, each with a single running slot (for the priority test)."""
    log_dir = tmp_path_factory.mktemp("tenants")
    args = ("--model", str(tiny_mixtral_dir), "--served-model-name", "m", "--api-keys-file", str(keys_file),
            "--redis-url", redis_url, *SETTINGS)
    with serve(log_dir, *args, env=ENV) as one, serve(log_dir, *args, env=ENV) as two:
        yield [one.url, two.url]


@pytest.fixture(scope="module")
def url(servers: list[str]) -> str:
    return servers[0]


def test_bad_keys_files_are_refused_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNSET_KEY", raising=False)
    for text, reason in (("keys:\n  - {key: a, role: owner}\n", "keys.0.role"),
                         ("keys:\n  - {key: a, rpm: 3}\n", "keys.0.rpm: Extra inputs"),
                         ("keys:\n  - {key: a, key_env: A}\n", "`key` or as `key_env`"),
                         ("keys:\n  - {key: a, requests_per_minute: 0}\n", "greater than 0"),
                         ("keys:\n  - {key_env: UNSET_KEY}\n", "UNSET_KEY is not set"),
                         ("keys:\n  - {name: x, key: a}\n  - {name: y, key: a}\n", "same secret"),
                         ("keys:\n  - {name: x, key: a}\n  - {name: x, key: b}\n", "'x' is given to more"),
                         ("keys: [\n", "not YAML"), ("keys: []\n", "at least 1")):
        path = tmp_path / "keys.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=reason):
            load_config(None, {"server": {"api_keys_file": str(path)}})
    with pytest.raises(ConfigError, match="missing.yaml: No such file"):
        load_config(None, {"server": {"api_keys_file": str(path.with_name("missing.yaml"))}})
    path.write_text("keys:\n  - {key: sk-flag}\n")
    with pytest.raises(ConfigError, match="same secret"):  # a file's key may not repeat --api-key's
        load_config(None, {"server": {"api_keys_file": str(path), "api_key": "sk-flag"}})
    with pytest.raises(ConfigError, match="redis_url"):
        load_config(None, {"server": {"redis_url": "localhost:6379"}})


def test_serve_refuses_a_bad_keys_file_or_an_unreachable_redis(tmp_path: Path) -> None:
    """Before any model loads: exit 2 (a configuration that cannot be used) with the reason, no traceback."""
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  - {key: a, tokens_per_minute: many}\n")
    for args, reason in ((["--api-keys-file", str(path)], "keys.0.tokens_per_minute"),
                         (["--redis-url", f"redis://127.0.0.1:{free_port()}/0"], "cannot reach Redis")):
        result = CliRunner().invoke(cli.app, ["serve", "--model", "localmoe-random", *args])
        assert result.exit_code == 2 and reason in result.output, result.output


def test_a_key_priority_is_the_default_and_the_most_urgent() -> None:
    key = APIKey("k", "user", digest(b"k"), priority=3)
    assert [key.priority_for(asked) for asked in (None, 5, 3, 0, -10)] == [3, 5, 3, 3, 3]
    unbound = APIKey("u", "user", digest(b"u"))
    assert [unbound.priority_for(asked) for asked in (None, -10)] == [0, -10]


def test_retry_after_is_when_the_window_frees_a_place() -> None:
    window = Window(request_times=[100.0, 110.0, 130.0], token_uses=[(100.0, 20), (110.0, 15), (130.0, 10)],
                    in_flight=2)
    now = 140.0
    assert refusal(Limits(requests_per_minute=4), window, now) is None
    assert refusal(Limits(requests_per_minute=3), window, now) == Refusal("requests_per_minute", 3, 20.0)
    assert refusal(Limits(requests_per_minute=2), window, now) == Refusal("requests_per_minute", 2, 30.0)
    assert refusal(Limits(tokens_per_minute=46), window, now) is None  # 45 used: under the limit
    assert refusal(Limits(tokens_per_minute=30), window, now) == Refusal("tokens_per_minute", 30, 20.0)
    assert refusal(Limits(tokens_per_minute=20), window, now) == Refusal("tokens_per_minute", 20, 30.0)
    assert refusal(Limits(max_concurrent_requests=2), window, now).limit == "max_concurrent_requests"
    # several refuse: the one that frees last
    assert refusal(Limits(3, 20, 2), window, now).limit == "tokens_per_minute"


def test_in_process_counters_without_redis() -> None:
    """What a server without --redis-url counts with: the same limits, in its own memory."""
    counters = LocalCounters()
    key = APIKey("k", "user", digest(b"k"), Limits(requests_per_minute=2, tokens_per_minute=10,
                                                   max_concurrent_requests=1))

    async def scenario() -> list:
        seen = [await counters.admit(key, "a"), await counters.admit(key, "b")]  # b: a is in flight
        await counters.release(key, "a")
        await counters.add_tokens(key, 4, 8)
        seen += [await counters.admit(key, "c"), await counters.totals()]
        return seen

    first, busy, spent, totals = asyncio.run(scenario())
    assert first is None and busy.limit == "max_concurrent_requests" and spent.limit == "tokens_per_minute"
    assert totals["k"] == {"requests": 1, "prompt_tokens": 4, "completion_tokens": 8,
                           "rejected:max_concurrent_requests": 1, "rejected:tokens_per_minute": 1}
    assert usage_summary(totals["k"])["total_tokens"] == 12


def test_requests_go_on_without_limits_while_redis_is_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    key = APIKey("k", "user", digest(b"k"), Limits(requests_per_minute=1))
    registry = CollectorRegistry()
    limiter = RateLimiter(RedisCounters(f"redis://127.0.0.1:{free_port()}/0"), KeyMetrics(registry, [key]), [key])

    async def admit_twice() -> list:
        return [await limiter.admit(key, "a"), await limiter.admit(key, "b")]

    with caplog.at_level(logging.WARNING, "localmoe"):
        assert asyncio.run(admit_twice()) == [None, None]
    assert "without its limits: the usage counters are unreachable" in caplog.text
    assert registry.get_sample_value("localmoe:api_key_requests_total", {"key_name": "k"}) == 2


def test_only_admin_keys_open_the_admin_routes(url: str) -> None:
    body = {"model_name": "/nonexistent/checkpoint", "served_model_name": "other"}
    for name in ("rpm", "interactive"):
        user = httpx.post(f"{url}/v1/models/load", json=body, headers={"Authorization": f"Bearer {KEYS[name]}"})
        assert user.status_code == 401 and "role user" in user.json()["error"]["message"]
        assert httpx.get(f"{url}/v1/stats/usage", headers={"Authorization": f"Bearer {KEYS[name]}"}
                         ).status_code == 401
    admin = httpx.post(f"{url}/v1/models/load", json=body, headers={"Authorization": f"Bearer {KEYS['ops']}"},
                       timeout=60)
    assert admin.status_code == 400 and "cannot load" in admin.json()["error"]["message"]  # past the key
    assert complete(url, "ops").choices  # an admin key opens the user routes too


def test_requests_per_minute(url: str) -> None:
    for _ in range(3):
        complete(url, "rpm")
    with pytest.raises(openai.RateLimitError) as refused:
        complete(url, "rpm")
    response = refused.value.response
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert response.json()["error"]["code"] == 429 and "requests per minute" in response.json()["error"]["message"]
    tgi = httpx.post(f"{url}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}},
                     headers={"Authorization": f"Bearer {KEYS['rpm']}"}, timeout=60)  # TGI's route, TGI's error
    assert tgi.status_code == 429 and 1 <= int(tgi.headers["retry-after"]) <= 60
    assert tgi.json()["error_type"] == "overloaded" and "requests per minute" in tgi.json()["error"]
    series = key_series(url)
    assert series["localmoe:api_key_requests_total", "rpm"] == 3
    assert series["localmoe:api_key_requests_rejected_total", "rpm", "requests_per_minute"] == 2


def test_concurrent_requests(url: str) -> None:
    # long enough that the server is still generating it (not just the client still reading it) when the next comes
    stream = client(url, "solo").completions.create(model="m", prompt="Hello", max_tokens=1000, stream=True,
                                                   extra_body={"ignore_eos": True})
    next(iter(stream))  # in flight
    with pytest.raises(openai.RateLimitError) as refused:
        complete(url, "solo")
    assert refused.value.response.headers["retry-after"] == "1"
    list(stream)  # read to the end: its place is free again
    assert complete(url, "solo").choices
    assert key_series(url)["localmoe:api_key_requests_rejected_total", "solo", "max_concurrent_requests"] == 1


def test_tokens_per_minute_counted_as_used(url: str) -> None:
    first = complete(url, "tpm", max_tokens=40)  # admitted with the minute's budget untouched; it may cross it
    assert first.usage.total_tokens > 30
    with pytest.raises(openai.RateLimitError) as refused:
        complete(url, "tpm")
    assert 1 <= int(refused.value.response.headers["retry-after"]) <= 60
    assert "tokens per minute" in refused.value.response.json()["error"]["message"]
    tpm = usage(url)["keys"]["tpm"]
    assert (tpm["requests"], tpm["prompt_tokens"], tpm["completion_tokens"], tpm["rejected"]) == (
        1, first.usage.prompt_tokens, 40, {"tokens_per_minute": 1})


def test_a_request_never_runs_more_urgent_than_its_key(url: str) -> None:
    """One running slot, held; `bulk` (key priority 10) asks for 0 and `interactive` (key priority 1) for 5: once
    the slot frees, interactive runs first, as 5 < 10. Unclamped, bulk's 0 would have gone first."""
    finished: list[str] = []

    def post(name: str, priority: int) -> None:
        complete(url, name, max_tokens=16, priority=priority)
        finished.append(name)

    with ThreadPoolExecutor(2) as pool:
        with occupied(url):
            bulk = pool.submit(post, "bulk", 0)
            wait_for_waiting(url, 1)
            interactive = pool.submit(post, "interactive", 5)
            wait_for_waiting(url, 2)
        bulk.result(), interactive.result()
    assert finished == ["interactive", "bulk"]


def test_usage_per_key(url: str) -> None:
    complete(url, "interactive", max_tokens=3)
    shown = usage(url)
    assert shown["shared"] is True
    interactive = shown["keys"]["interactive"]
    assert interactive["priority"] == 1 and interactive["requests"] >= 1 and interactive["completion_tokens"] >= 3
    assert shown["keys"]["ops"]["role"] == "admin" and shown["keys"]["rpm"]["limits"]["requests_per_minute"] == 3
    series = key_series(url)
    for name in ("interactive", "rpm", "tpm"):
        assert series["localmoe:api_key_requests_total", name] == shown["keys"][name]["requests"]
        assert series["localmoe:api_key_generation_tokens_total", name] == shown["keys"][name]["completion_tokens"]
        assert series["localmoe:api_key_prompt_tokens_total", name] == shown["keys"][name]["prompt_tokens"]


def test_two_servers_share_the_limits_through_redis(servers: list[str]) -> None:
    one, two = servers
    for url in (one, two, one, two):  # four, the key's limit, split between the two
        complete(url, "shared")
    with pytest.raises(openai.RateLimitError) as refused:
        complete(one, "shared")
    assert 1 <= int(refused.value.response.headers["retry-after"]) <= 60
    shared = usage(two)  # the totals of both servers, on either
    assert shared["shared"] is True
    assert (shared["keys"]["shared"]["requests"], shared["keys"]["shared"]["rejected"]) == (
        4, {"requests_per_minute": 1})
    assert shared["keys"]["shared"]["completion_tokens"] == 4
    assert key_series(two)["localmoe:api_key_requests_total", "shared"] == 2  # /metrics: this server's part

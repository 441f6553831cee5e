"""Hold under fire: a real `localmoe serve` of the built-in model on the default path (bf16, the CPU kernels where
the CPU has AVX512-BF16) survives long prompts, poison requests among live streams, bursts past its bound,
SIGTERM with streams in flight, and reports a dead or wedged engine on /health."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from localmoe.layers.cpu_kernels import cpu_has_avx512_bf16
from localmoe.models.builtin import SHIPPED_DIR
from server_process import SMALL_KV, ServerProcess, auth, healthy, rejected, scrape, serve

STEP_TOKENS = 256  # --max-num-batched-tokens here: 3x of it still fits the built-in model's 1024 positions
TIMEOUT = 300  # per HTTP call, only against a hang


def completion(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, headers=auth(), timeout=TIMEOUT)


def stream_events(url: str, body: dict, started: threading.Event | None = None) -> list[str]:
    """Every `data:` payload of a streamed completion, in order; sets `started` at the first one."""
    events = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, headers=auth(),
                      timeout=TIMEOUT) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                if started is not None:
                    started.set()
    return events


def streamed_text(events: list[str]) -> tuple[str, list[str | None]]:
    """(text, finish reasons) of a single-choice stream that ended with [DONE]."""
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks), chunks
    return "".join(c["choices"][0]["text"] for c in chunks), [c["choices"][0]["finish_reason"] for c in chunks]


def prompt_ids(url: str, count: int) -> list[int]:
    """`count` token ids of English from the built-in model's held-out text."""
    text = (SHIPPED_DIR / "heldout_sample.txt").read_text()
    ids = httpx.post(f"{url}/tokenize", json={"prompt": text}, headers=auth(), timeout=TIMEOUT).json()["tokens"]
    assert len(ids) >= count
    return ids[:count]


@pytest.fixture(scope="module")
def builtin(tmp_path_factory) -> Iterator[ServerProcess]:
    """The README's `localmoe serve` (built-in model, bf16, kernels on, default settings) with a smaller token
    budget per step."""
    with serve(tmp_path_factory.mktemp("builtin"), "--max-num-batched-tokens", str(STEP_TOKENS)) as server:
        yield server


# ---- long prompts on the kernel path -----------------------------------------------------------


@pytest.mark.avx512_bf16
@pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="the CPU kernels need AVX512-BF16")
def test_prompts_longer_than_a_step_match_the_pytorch_paths(builtin: ServerProcess, tmp_path: Path) -> None:
    """Prompts of 1.5x and 3x the step's token budget run as chunks that sample nothing (the case that once reached
    a kernel with zero rows); their 32 greedy tokens match the same bf16 model without our kernels, or part from
    it only at a near-tie of the reference."""
    body = {"max_tokens": 32, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    with serve(tmp_path, "--max-num-batched-tokens", str(STEP_TOKENS), *SMALL_KV,
               env={"LOCALMOE_CPU_KERNELS": "0"}) as reference:
        for count in (STEP_TOKENS * 3 // 2, STEP_TOKENS * 3):
            ids = prompt_ids(builtin.url, count)
            fast = completion(builtin.url, {**body, "prompt": ids}).json()["choices"][0]["logprobs"]
            slow = completion(reference.url, {**body, "prompt": ids}).json()["choices"][0]["logprobs"]
            assert len(fast["tokens"]) == len(slow["tokens"]) == 32
            if fast["tokens"] != slow["tokens"]:
                at = next(i for i, (a, b) in enumerate(zip(fast["tokens"], slow["tokens"])) if a != b)
                top = sorted(slow["top_logprobs"][at].values(), reverse=True)
                gap = top[0] - top[1]
                print(f"{count}-token prompt: first difference at token {at}, reference top-2 gap {gap:.4f}")
                assert fast["tokens"][at] in slow["top_logprobs"][at] and gap < 0.05
    assert healthy(builtin.url)


# ---- poison requests among live streams ----------------------------------------------------------


POISONS = [
    ("/v1/completions", {"prompt": "a", "top_k": 2**70}),
    ("/v1/completions", {"prompt": "a", "seed": 2**70}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "seed": -2**70}),
    ("/v1/completions", {"prompt": "\ud800x"}),
    ("/tokenize", {"prompt": "\ud800x"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}),
    ("/v1/completions", {"prompt": "a", "stop_token_ids": [1e12, -5]}),
    ("/v1/completions", {"prompt": "a", "min_tokens": 1e12}),
    ("/v1/completions", {"prompt": "a", "top_k": 1e12}),
    ("/v1/completions", {"prompt": "a", "repetition_penalty": 1e308}),
    ("/v1/completions", {"prompt": "a", "stop": ["x" * 1024] * 1000}),
    ("/v1/completions", {"prompt": "a", "logprobs": 21}),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"99999": 5}}),
    ("/v1/completions", {"prompt": "a", "n": 10**6}),
    ("/v1/completions", {"prompt": "a", "top_k": 10**6, "stream": True}),  # refused before the stream starts
    ("/v1/completions", {"prompt": [[5, 6], [5, 10**6]], "stream": True}),
]


def test_poison_requests_among_streams_fail_alone(builtin: ServerProcess) -> None:
    url = builtin.url
    body = {"prompt": "It is a truth universally acknowledged", "max_tokens": 48, "ignore_eos": True,
            "temperature": 0}
    started = [threading.Event() for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(stream_events, url, body, event) for event in started]
        assert all(event.wait(TIMEOUT) for event in started)
        refusals = [httpx.post(f"{url}{path}", content=json.dumps(poison).encode(), timeout=TIMEOUT,
                               headers={**auth(), "Content-Type": "application/json"}) for path, poison in POISONS]
        results = [streamed_text(s.result()) for s in streams]
    for (path, poison), response in zip(POISONS, refusals):
        assert response.status_code == 400, (path, poison, response.text)
        assert response.json()["error"]["message"]
    reference = completion(url, body).json()["choices"][0]["text"]
    for text, reasons in results:  # every stream got its whole answer, the same one it gets alone
        assert text == reference and reasons[-1] == "length"


# ---- admission --------------------------------------------------------------------------------------


def test_burst_past_the_bound_is_refused_with_503(tmp_path: Path) -> None:
    """--max-num-seqs 4 --max-waiting-requests 4: of a burst of 24, at most 8 are admitted, each other one is
    a 503 with Retry-After at once, and none is lost or hangs."""
    with serve(tmp_path, "--max-num-seqs", "4", "--max-waiting-requests", "4", *SMALL_KV) as server:
        url = server.url
        body = {"prompt": "The burst", "max_tokens": 300, "ignore_eos": True}
        peak_waiting = peak_admitted = 0
        done = threading.Event()

        def watch() -> None:
            nonlocal peak_waiting, peak_admitted
            while not done.is_set():
                now = scrape(url)
                peak_waiting = max(peak_waiting, now["vllm:num_requests_waiting"])
                peak_admitted = max(peak_admitted, now["localmoe:num_sequences_admitted"])
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        with ThreadPoolExecutor(24) as pool:
            responses = list(pool.map(lambda _: completion(url, body), range(24)))
        done.set()
        watcher.join()
        admitted = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code == 503]
        assert len(admitted) + len(refused) == 24
        assert 4 <= len(admitted) <= 8 and peak_waiting <= 4
        assert all(r.headers["retry-after"] and r.json()["error"]["code"] == 503 for r in refused)
        assert peak_admitted <= 8
        assert all(r.json()["usage"]["completion_tokens"] == 300 for r in admitted)
        assert rejected(url) == {"503": len(refused), "429": 0}
        # what could never be admitted is a client error, not "retry later"
        never = [{"prompt": ["p"] * 10}, {"prompt": "p", "n": 1000}, {"prompt": ["p", "q", "r"], "n": 3}]
        for request in never:
            response = completion(url, {**request, "max_tokens": 2})
            assert response.status_code == 400, response.text
        assert rejected(url) == {"503": len(refused), "429": 0}
        after = scrape(url)
        assert after["vllm:num_requests_running"] == after["vllm:num_requests_waiting"] == 0
        assert after["localmoe:num_sequences_admitted"] == 0  # every place given back


# ---- shutdown and liveness ------------------------------------------------------------------------


def test_sigterm_lets_streams_finish_then_exits(tmp_path: Path) -> None:
    with serve(tmp_path, *SMALL_KV) as server:
        body = {"prompt": "Drain me", "max_tokens": 200, "ignore_eos": True}
        started = [threading.Event() for _ in range(4)]
        with ThreadPoolExecutor(4) as pool:
            streams = [pool.submit(stream_events, server.url, body, event) for event in started]
            assert all(event.wait(TIMEOUT) for event in started)
            server.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while (refused := completion(server.url, {"prompt": "late"})).status_code != 503:
                assert time.monotonic() < deadline, "the server kept admitting after SIGTERM"
            assert refused.headers["retry-after"]
            results = [streamed_text(s.result()) for s in streams]
        assert all(reasons[-1] == "length" for _, reasons in results)
        assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)


def test_streams_past_the_shutdown_timeout_end_with_an_error_event(tmp_path: Path) -> None:
    with serve(tmp_path, *SMALL_KV, "--shutdown-timeout", "0.5") as server:
        started = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            stream = pool.submit(stream_events, server.url, {"prompt": "Never done", "max_tokens": 900,
                                                             "ignore_eos": True}, started)
            assert started.wait(TIMEOUT)
            server.process.send_signal(signal.SIGTERM)
            events = stream.result()
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == 503
        assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)


def test_dead_engine_thread_fails_health_and_requests(tmp_path: Path) -> None:
    with serve(tmp_path, *SMALL_KV, env={"LOCALMOE_FAULT_INJECTION": "engine-exit"}) as server:
        response = completion(server.url, {"prompt": "the step that ends the thread"})
        assert response.status_code == 503, response.text
        assert httpx.get(f"{server.url}/health", timeout=TIMEOUT).status_code == 503
        assert completion(server.url, {"prompt": "after"}).status_code == 503  # refused, not left hanging
        assert "the engine thread stopped" in server.log()


def test_wedged_engine_fails_health(tmp_path: Path) -> None:
    with serve(tmp_path, *SMALL_KV, "--engine-stall-timeout", "1", "--shutdown-timeout", "1",
               env={"LOCALMOE_FAULT_INJECTION": "engine-stall"}) as server:
        with ThreadPoolExecutor(1) as pool:
            stuck = pool.submit(stream_events, server.url, {"prompt": "stuck"})
            deadline = time.monotonic() + 60
            while healthy(server.url):
                assert time.monotonic() < deadline, "/health stayed 200 with the engine stalled"
                time.sleep(0.2)
            server.process.send_signal(signal.SIGTERM)  # the drain ends the stuck stream with an error
            events = stuck.result()
        assert events[-1] == "[DONE]" and "error" in json.loads(events[-2])
        assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)

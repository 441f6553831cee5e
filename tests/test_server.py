"""The OpenAI-compatible server, end to end: a real `localmoe serve` process and the official client."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer

from server_process import API_KEY, auth, rejected, scrape, serve

MAX_MODEL_LEN = 4096  # the tiny checkpoint's max_position_embeddings


@contextmanager
def running_server(checkpoint: Path, log_dir: Path, *extra: str) -> Iterator[str]:
    """A real `localmoe serve` of `checkpoint` in float32; yields its base URL."""
    with serve(log_dir, "--model", str(checkpoint), "--dtype", "float32", "--kv-cache-memory", "64000000",
               "--max-model-len", str(MAX_MODEL_LEN), *extra) as server:
        yield server.url


@pytest.fixture(scope="module")
def base_url(tiny_mixtral_dir: Path, tmp_path_factory) -> Iterator[str]:
    with running_server(tiny_mixtral_dir, tmp_path_factory.mktemp("server")) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    # retries cover a kept-alive connection the server closed as the next request went out (uvicorn closes idle
    # ones after 5 s); refusals (4xx) are never retried, so the error tests see them as sent
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=2)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def tokenizer(tiny_mixtral_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_mixtral_dir)


def sse_lines(base_url: str, path: str, body: dict) -> list[str]:
    with httpx.stream("POST", f"{base_url}{path}", json=body, headers=auth(), timeout=60) as response:
        assert response.status_code == 200
        return [line for line in response.iter_lines() if line]


# ---- generation ------------------------------------------------------------------------------


def test_models_lists_the_served_model(client: openai.OpenAI, tiny_mixtral_dir: Path) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [str(tiny_mixtral_dir)]


def test_completion_and_usage(client: openai.OpenAI, model: str, tokenizer) -> None:
    prompt = "The quick brown fox"
    result = client.completions.create(model=model, prompt=prompt, max_tokens=7, temperature=0,
                                       logprobs=1, extra_body={"ignore_eos": True})
    choice = result.choices[0]
    assert choice.finish_reason == "length"
    assert result.usage.prompt_tokens == len(tokenizer(prompt).input_ids)
    assert result.usage.completion_tokens == 7 == len(choice.logprobs.tokens)
    assert result.usage.total_tokens == result.usage.prompt_tokens + 7


def test_echo_puts_the_prompt_first(client: openai.OpenAI, model: str) -> None:
    result = client.completions.create(model=model, prompt="Echo me", max_tokens=3, echo=True, temperature=0)
    plain = client.completions.create(model=model, prompt="Echo me", max_tokens=3, temperature=0)
    assert result.choices[0].text == "Echo me" + plain.choices[0].text


def test_echo_with_logprobs_scores_the_prompt_like_transformers(client: openai.OpenAI, model: str, tokenizer,
                                                                tiny_mixtral_dir: Path) -> None:
    """lm-eval's loglikelihood request: the prompt echoed with each of its tokens' logprobs (none for the first),
    then the one generated token's; streamed, the same entries arrive in chunks."""
    from transformers import AutoModelForCausalLM

    prompt = "The quick brown fox jumps over"
    kwargs = dict(model=model, prompt=prompt, max_tokens=1, echo=True, logprobs=1, temperature=0)
    result = client.completions.create(**kwargs).choices[0]
    ids = tokenizer(prompt).input_ids
    lp = result.logprobs
    assert result.text.startswith(prompt) and len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    reference = AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        expected = torch.log_softmax(reference(torch.tensor([ids])).logits[0].float(), dim=-1)
    wanted = expected[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:len(ids)]), wanted, atol=1e-4)
    plain = client.completions.create(model=model, prompt=prompt, max_tokens=1, logprobs=1, temperature=0)
    assert lp.token_logprobs[-1] == pytest.approx(plain.choices[0].logprobs.token_logprobs[0])
    streamed = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kwargs)
                if c.choices and c.choices[0].logprobs]
    assert sum((c.tokens for c in streamed), []) == lp.tokens
    assert sum((c.token_logprobs for c in streamed), []) == pytest.approx(lp.token_logprobs)


def test_list_of_prompts_times_n(client: openai.OpenAI, model: str) -> None:
    result = client.completions.create(model=model, prompt=["one", "two", "three"], n=2, max_tokens=3,
                                       extra_body={"ignore_eos": True})
    assert sorted(c.index for c in result.choices) == list(range(6))
    assert result.usage.completion_tokens == 6 * 3
    # Greedy: the two choices of one prompt agree, and the prompts differ.
    greedy = client.completions.create(model=model, prompt=["one", "two"], n=2, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    texts = {c.index: c.text for c in greedy.choices}
    assert texts[0] == texts[1] and texts[2] == texts[3]


def test_token_id_prompt_matches_text_prompt(client: openai.OpenAI, model: str, tokenizer) -> None:
    kwargs = dict(model=model, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    by_text = client.completions.create(prompt="Hello there", **kwargs)
    by_ids = client.completions.create(prompt=tokenizer("Hello there").input_ids, **kwargs)
    assert by_text.choices[0].text == by_ids.choices[0].text


def test_chat_completion(client: openai.OpenAI, model: str, tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    result = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=5,
                                            logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert result.usage.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False).input_ids)
    assert result.usage.completion_tokens == 5
    choice = result.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert len(choice.logprobs.content) == 5
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)


def test_completion_stream_concatenates_to_the_full_text(client: openai.OpenAI, model: str,
                                                         base_url: str) -> None:
    kwargs = dict(model=model, prompt="Once upon a time", max_tokens=12, temperature=0,
                  extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    with_logprobs = list(client.completions.create(stream=True, logprobs=2, **kwargs))
    assert sum(len(c.choices[0].logprobs.tokens) for c in with_logprobs) == 12
    lines = sse_lines(base_url, "/v1/completions", {"model": model, "prompt": "Once upon a time", "max_tokens": 2,
                                                    "stream": True})
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_chat_stream_concatenates_to_the_full_text(client: openai.OpenAI, model: str, base_url: str) -> None:
    kwargs = dict(model=model, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=10,
                  temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason == "length"
    lines = sse_lines(base_url, "/v1/chat/completions", {"model": model, "messages": kwargs["messages"],
                                                         "max_tokens": 2, "stream": True})
    assert lines[-1] == "data: [DONE]"


def test_n_samples_differ(client: openai.OpenAI, model: str) -> None:
    result = client.completions.create(model=model, prompt="Pick a word:", n=2, max_tokens=10, temperature=1,
                                       extra_body={"ignore_eos": True})
    assert len(result.choices) == 2
    assert result.choices[0].text != result.choices[1].text


def test_seed_makes_sampling_repeatable(client: openai.OpenAI, model: str) -> None:
    def sample(seed: int) -> str:
        return client.completions.create(model=model, prompt="Random:", max_tokens=10, temperature=1, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_stop_string_ends_the_text_before_it(client: openai.OpenAI, model: str) -> None:
    kwargs = dict(model=model, prompt="Count: 1 2 3", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs).choices[0].text
    # A character the greedy continuation produces (past its first one), so stopping on it cuts the text.
    stop = next(ch for ch in full[1:] if ch != "\ufffd" and not ch.isspace())
    choice = client.completions.create(stop=[stop], **kwargs).choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == full[:full.index(stop)]
    assert stop not in choice.text


# ---- metrics and disconnects -----------------------------------------------------------------


def test_metrics_count_exactly_the_tokens_served(client: openai.OpenAI, model: str, base_url: str) -> None:
    before = scrape(base_url)
    result = client.completions.create(model=model, prompt="Metrics please", max_tokens=9,
                                       extra_body={"ignore_eos": True})
    after = scrape(base_url)
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == result.usage.prompt_tokens
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 9
    assert after["vllm:e2e_request_latency_seconds_count"] == before["vllm:e2e_request_latency_seconds_count"] + 1
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
                 "vllm:time_to_first_token_seconds_count", "vllm:time_per_output_token_seconds_count",
                 "vllm:request_prompt_tokens_count", "vllm:request_generation_tokens_count",
                 "localmoe:num_swapped_out_total", "localmoe:num_prefill_chunks_total"):
        assert name in after


def test_client_disconnect_aborts_the_request(base_url: str, model: str) -> None:
    prompt = "Go on forever"
    body = {"model": model, "prompt": prompt, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    before = scrape(base_url)
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, headers=auth(), timeout=60) as response:
        lines = response.iter_lines()
        received = [line for line in (next(lines) for _ in range(6)) if line]
        assert received and all(line.startswith("data: {") for line in received)
        during = scrape(base_url)
    assert during["vllm:num_requests_running"] == 1 and during["vllm:kv_cache_usage_perc"] > 0
    deadline = time.monotonic() + 2
    while ((after := scrape(base_url))["vllm:num_requests_running"] or after["vllm:kv_cache_usage_perc"]
           or after["localmoe:num_sequences_admitted"]):
        assert time.monotonic() < deadline, f"request still holds the KV cache or its place: {after}"
        time.sleep(0.05)
    # Stopped by the abort, not by running out of tokens to generate.
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert generated < body["max_tokens"]
    assert scrape(base_url)["vllm:generation_tokens_total"] == after["vllm:generation_tokens_total"]


def test_client_timeout_aborts_a_non_streaming_request(base_url: str, model: str) -> None:
    body = {"model": model, "prompt": "Go on", "max_tokens": 2000, "ignore_eos": True}
    before = scrape(base_url)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{base_url}/v1/completions", json=body, headers=auth(), timeout=0.5)
    deadline = time.monotonic() + 2
    while ((after := scrape(base_url))["vllm:num_requests_running"] or after["vllm:kv_cache_usage_perc"]
           or after["localmoe:num_sequences_admitted"]):
        assert time.monotonic() < deadline, f"request still holds the KV cache or its place: {after}"
        time.sleep(0.05)
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] < body["max_tokens"]


# ---- refusals ----------------------------------------------------------------------------------


BAD_REQUESTS = [
    pytest.param("/v1/completions", b"{not json", 400, id="invalid-json"),
    pytest.param("/v1/completions", {"max_tokens": 4}, 400, id="missing-prompt"),
    pytest.param("/v1/completions", {"prompt": 5}, 400, id="prompt-wrong-type"),
    pytest.param("/v1/completions", {"prompt": "a", "max_tokens": "many"}, 400, id="max-tokens-wrong-type"),
    pytest.param("/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, id="max-tokens-zero"),
    pytest.param("/v1/completions", {"prompt": "a", "temperature": 2.5}, 400, id="temperature-high"),
    pytest.param("/v1/completions", {"prompt": "a", "temperature": -0.1}, 400, id="temperature-negative"),
    pytest.param("/v1/completions", {"prompt": "a", "top_p": 0}, 400, id="top-p-zero"),
    pytest.param("/v1/completions", {"prompt": "a", "top_p": 1.5}, 400, id="top-p-high"),
    pytest.param("/v1/completions", {"prompt": "x" * (MAX_MODEL_LEN + 1)}, 400, id="prompt-too-long"),
    pytest.param("/v1/completions", {"prompt": "x" * 200, "max_tokens": MAX_MODEL_LEN - 199}, 400,
                 id="prompt-plus-max-tokens-too-long"),
    pytest.param("/v1/completions", {"prompt": [10**6]}, 400, id="token-out-of-vocab"),
    pytest.param("/v1/completions", {"prompt": ""}, 400, id="empty-prompt"),
    pytest.param("/v1/completions", {"prompt": "a", "model": "no-such-model"}, 404, id="unknown-model"),
    pytest.param("/v1/chat/completions", {"messages": []}, 400, id="no-messages"),
    pytest.param("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "n": 0}, 400, id="n-zero"),
    pytest.param("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 21,
                                          "logprobs": True}, 400, id="top-logprobs-high"),
    pytest.param("/detokenize", {"tokens": [-1]}, 400, id="detokenize-bad-token"),
]


@pytest.mark.parametrize("path, body, status", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(base_url: str, path: str, body: dict | bytes, status: int) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{base_url}{path}", content=content,
                          headers={**auth(), "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["message"] and error["type"]
    assert set(error) == {"message", "type", "param", "code"}


PROTECTED_ROUTES = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                    ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/metrics"), ("GET", "/dashboard"),
                    ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/version"), ("GET", "/v1/stats/experts"),
                    ("GET", "/v1/stats/memory"), ("GET", "/v1/stats/performance")]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                                     {"Authorization": "Basic " + base64.b64encode(b"user:wrong").decode()}])
def test_every_route_but_health_needs_the_api_key(base_url: str, headers: dict[str, str]) -> None:
    for method, path in PROTECTED_ROUTES:
        response = httpx.request(method, f"{base_url}{path}", json={"prompt": "a"}, headers=headers)
        assert response.status_code == 401, (method, path)
        assert response.json()["error"]["code"] == 401
        assert response.headers["www-authenticate"].startswith("Basic")  # a browser asks for the key
    health = httpx.get(f"{base_url}/health")
    assert health.status_code == 200 and not health.content  # liveness, free of information


def test_the_key_as_basic_password_opens_the_dashboard(base_url: str) -> None:
    basic = {"Authorization": "Basic " + base64.b64encode(f"anyone:{API_KEY}".encode()).decode()}
    assert httpx.get(f"{base_url}/dashboard", headers=basic).status_code == 200
    assert httpx.get(f"{base_url}/v1/stats/experts", headers=basic).status_code == 200
    assert httpx.get(f"{base_url}/metrics", headers=auth()).status_code == 200


def test_client_sees_typed_errors_and_server_keeps_serving(client: openai.OpenAI, model: str,
                                                           base_url: str) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="a", max_tokens=0)
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=model, prompt="y" * (MAX_MODEL_LEN + 5))
    assert too_long.value.body["param"] == "prompt"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "a"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0).models.list()
    result = client.completions.create(model=model, prompt="still here", max_tokens=3,
                                       extra_body={"ignore_eos": True})
    assert result.usage.completion_tokens == 3


# ---- tokenizer routes and version -------------------------------------------------------------


def test_tokenize_and_detokenize(base_url: str, tokenizer) -> None:
    response = httpx.post(f"{base_url}/tokenize", json={"prompt": "Hello, world"}, headers=auth()).json()
    assert response["tokens"] == tokenizer("Hello, world").input_ids
    assert response["count"] == len(response["tokens"]) and response["max_model_len"] == MAX_MODEL_LEN
    messages = [{"role": "user", "content": "Hi"}]
    chat = httpx.post(f"{base_url}/tokenize", json={"messages": messages}, headers=auth()).json()
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tokenizer(rendered, add_special_tokens=False).input_ids
    back = httpx.post(f"{base_url}/detokenize", json={"tokens": response["tokens"]}, headers=auth()).json()
    assert back == {"prompt": "Hello, world"}


def test_version(base_url: str) -> None:
    assert httpx.get(f"{base_url}/version", headers=auth()).json()["version"]


@pytest.fixture(scope="module")
def single_slot_url(tiny_mixtral_dir: Path, tmp_path_factory) -> Iterator[str]:
    """A server that runs one request at a time and queues at most two."""
    log_dir = tmp_path_factory.mktemp("single-slot")
    with running_server(tiny_mixtral_dir, log_dir, "--max-num-seqs", "1", "--max-waiting-requests", "2") as url:
        yield url


@contextmanager
def occupied(url: str) -> Iterator[None]:
    """Hold the only running slot with an endless stream until the block exits."""
    body = {"prompt": "busy", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=auth(), timeout=60) as stream:
        lines = stream.iter_lines()  # held: dropping the iterator would close the stream
        next(lines)
        yield


def wait_for_waiting(url: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while scrape(url)["vllm:num_requests_waiting"] < count:
        assert time.monotonic() < deadline, "requests never queued"
        time.sleep(0.02)


def test_full_waiting_queue_answers_503_with_retry_after(single_slot_url: str) -> None:
    url = single_slot_url
    body = {"prompt": "queued", "max_tokens": 2, "ignore_eos": True}
    with ThreadPoolExecutor(2) as pool, occupied(url):
        queued = [pool.submit(httpx.post, f"{url}/v1/completions", json=body, headers=auth(), timeout=60)
                  for _ in range(2)]
        wait_for_waiting(url, 2)
        refused = httpx.post(f"{url}/v1/completions", json=body, headers=auth())
        tgi = httpx.post(f"{url}/generate", json={"inputs": "queued", "parameters": {"max_new_tokens": 2}},
                         headers=auth())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == 503
    assert tgi.status_code == 429 and tgi.json()["error_type"] == "overloaded"  # TGI's answer to the same
    assert rejected(url) == {"503": 1, "429": 1}  # what the rejection alert counts, by status
    assert all(f.result().status_code == 200 for f in queued)  # the queued ones were served


def test_priority_field_orders_waiting_requests(single_slot_url: str) -> None:
    url = single_slot_url
    finished: list[str] = []

    def post(name: str, priority: int) -> None:
        body = {"prompt": name, "max_tokens": 2, "ignore_eos": True, "priority": priority}
        assert httpx.post(f"{url}/v1/completions", json=body, headers=auth(), timeout=60).status_code == 200
        finished.append(name)

    with ThreadPoolExecutor(2) as pool, occupied(url):
        later = pool.submit(post, "later", 5)
        wait_for_waiting(url, 1)
        urgent = pool.submit(post, "urgent", -5)
        wait_for_waiting(url, 2)
    later.result(), urgent.result()
    assert finished == ["urgent", "later"]

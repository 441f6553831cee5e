"""TGI's routes (issue 19 item 5), through Hugging Face's own TGI client (huggingface_hub.InferenceClient's
text_generation) against a real `localmoe serve`: answers, streams, details and errors it understands."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError

from server_process import API_KEY, auth, serve

PROMPT = "The experts route"


@pytest.fixture(scope="module")
def url(tiny_mixtral_dir: Path, tmp_path_factory) -> Iterator[str]:
    with serve(tmp_path_factory.mktemp("tgi"), "--model", str(tiny_mixtral_dir), "--dtype", "float32",
               "--kv-cache-memory", "64000000", "--max-model-len", "512") as server:
        yield server.url


@pytest.fixture(scope="module")
def client(url: str) -> InferenceClient:
    return InferenceClient(base_url=url, api_key=API_KEY)


def openai_greedy(url: str, max_tokens: int) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY)
    return client.completions.create(model=client.models.list().data[0].id, prompt=PROMPT, max_tokens=max_tokens,
                                     temperature=0, extra_body={"ignore_eos": True}).choices[0].text


def test_generate_with_details_matches_the_openai_route(client: InferenceClient, url: str) -> None:
    out = client.text_generation(PROMPT, max_new_tokens=8, details=True, decoder_input_details=True,
                                 top_n_tokens=2)
    details = out.details
    assert details.finish_reason in ("length", "eos_token") and details.generated_tokens == len(details.tokens)
    if details.finish_reason == "length":
        assert details.generated_tokens == 8 and out.generated_text == openai_greedy(url, 8)
    assert "".join(token.text for token in details.tokens) == out.generated_text
    assert all(token.logprob <= 0 for token in details.tokens)
    assert len(details.prefill) > 1 and details.prefill[0].logprob is None  # nothing precedes the first
    assert all(len(top) == 2 and top[0]["id"] == token.id for top, token in zip(details.top_tokens, details.tokens))


def test_stream_reassembles_the_text(client: InferenceClient) -> None:
    whole = client.text_generation(PROMPT, max_new_tokens=10)
    events = list(client.text_generation(PROMPT, max_new_tokens=10, stream=True, details=True))
    assert "".join(event.token.text for event in events) == whole
    assert events[-1].generated_text == whole and events[-1].details.generated_tokens == len(events)
    assert all(event.details is None for event in events[:-1])


def test_sampling_stop_sequences_and_grammar(client: InferenceClient) -> None:
    seeded = [client.text_generation(PROMPT, max_new_tokens=6, do_sample=True, seed=7, temperature=1.5)
              for _ in range(2)]
    assert seeded[0] == seeded[1]
    text = client.text_generation(PROMPT, max_new_tokens=30, details=True, grammar={"type": "regex", "value": "ab+c"})
    assert re.fullmatch("ab+c", text.generated_text) and text.details.finish_reason == "eos_token"
    stopped = client.text_generation(PROMPT, max_new_tokens=30, details=True, stop=["b"],
                                     grammar={"type": "regex", "value": "ab+c"})
    assert stopped.generated_text == "a" and stopped.details.finish_reason == "stop_sequence"
    full = client.text_generation(PROMPT, max_new_tokens=3, return_full_text=True)
    assert full.startswith(PROMPT)


def test_errors_in_tgi_shape(client: InferenceClient, url: str) -> None:
    with pytest.raises(ValidationError, match="typical_p"):
        client.text_generation(PROMPT, max_new_tokens=2, typical_p=0.5)
    answer = httpx.post(f"{url}/generate", json={"inputs": ""}, headers=auth())
    assert answer.status_code == 422 and answer.json()["error_type"] == "validation"
    answer = httpx.post(f"{url}/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2, "colour": 1}},
                        headers=auth())
    assert answer.status_code == 422 and "colour" in answer.json()["error"]
    answer = httpx.post(f"{url}/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 10_000}},
                        headers=auth())
    assert answer.status_code == 422 and answer.json()["error_type"] == "validation"


def test_generate_headers_and_info(url: str) -> None:
    answer = httpx.post(f"{url}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}},
                        headers=auth())
    assert isinstance(answer.json(), dict) and "generated_text" in answer.json()  # / answers a list, /generate not
    headers = answer.headers
    assert headers["x-compute-type"] == "cpu" and int(headers["x-generated-tokens"]) <= 4
    tokens = httpx.post(f"{url}/tokenize", json={"prompt": PROMPT}, headers=auth()).json()["count"]
    assert int(headers["x-prompt-tokens"]) == tokens
    assert int(headers["x-total-time"]) >= int(headers["x-inference-time"]) >= 0 and int(headers["x-queue-time"]) >= 0
    info = httpx.get(f"{url}/info", headers=auth()).json()
    assert info["max_total_tokens"] == 512 and info["model_pipeline_tag"] == "text-generation"
    assert info["model_dtype"] == "float32" and info["model_device_type"] == "cpu"


def test_tgi_environment_variables_start_the_server(tiny_mixtral_dir: Path, tmp_path: Path) -> None:
    """A TGI deployment's variables, with the image swapped for ours: MODEL_ID and its settings are read (and only
    where MODEL_ID is set)."""
    from localmoe.server.tgi import tgi_environment

    assert tgi_environment({"PORT": "80", "HOSTNAME": "box"}) == {"engine": {}, "server": {}}
    env = {"MODEL_ID": str(tiny_mixtral_dir), "MAX_TOTAL_TOKENS": "384", "MAX_BATCH_PREFILL_TOKENS": "128",
           "DTYPE": "float32", "MAX_BATCH_SIZE": "3"}
    with serve(tmp_path, "--kv-cache-memory", "64000000", env=env) as server:
        info = httpx.get(f"{server.url}/info", headers=auth()).json()
        assert info["model_id"] == str(tiny_mixtral_dir) and info["max_total_tokens"] == 384
        assert info["max_batch_total_tokens"] == 128 and info["model_dtype"] == "float32"
        assert info["max_concurrent_requests"] == 3 + 1024  # max_num_seqs + the default waiting room

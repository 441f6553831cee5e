"""Several models behind one endpoint (issue 19): a `models:` list in the config file, each model its own engine,
requests routed by `model`, every metric series labelled by model_name, statistics per model."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from checkpoints import make_checkpoint
from localmoe import LLM, SamplingParams
from localmoe.config import ConfigError, load_config
from server_process import API_KEY, auth, serve

SETTINGS = {"dtype": "float32", "kv_cache_memory": 64_000_000, "max_model_len": 512}
PROMPT = [5, 17, 99, 3, 250, 42, 8]


@pytest.fixture(scope="module")
def checkpoints(tiny_mixtral_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Two different MoE families, so a request routed to the wrong engine would show."""
    return {"mixtral-a": tiny_mixtral_dir,
            "qwen-b": make_checkpoint(tmp_path_factory.mktemp("qwen-b"), "Qwen2Moe", seed=4, num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=48, num_hidden_layers=2)}


@pytest.fixture(scope="module")
def two_models(checkpoints: dict[str, Path], tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("two-models")
    config = directory / "config.yaml"
    config.write_text("vllm:\n" + "".join(f"  {k}: {v}\n" for k, v in SETTINGS.items()) + "models:\n" + "".join(
        f"  - model_name: {path}\n    served_model_name: {name}\n" for name, path in checkpoints.items()))
    with serve(directory, "--config", str(config)) as server:
        yield server.url


def alone(checkpoint: Path) -> str:
    """The model's greedy text for PROMPT, served alone (the offline engine)."""
    llm = LLM(model=str(checkpoint), **SETTINGS)
    out = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    return out[0].outputs[0].text


def test_each_model_answers_under_its_name_as_it_does_alone(two_models: str, checkpoints: dict[str, Path]) -> None:
    client = openai.OpenAI(base_url=f"{two_models}/v1", api_key=API_KEY)
    cards = client.models.list().data
    assert [card.id for card in cards] == list(checkpoints)
    assert all(card.model_extra["state"] == "loaded" for card in cards)
    texts = {name: alone(checkpoint) for name, checkpoint in checkpoints.items()}
    assert len(set(texts.values())) == 2  # a request routed to the other engine would show
    for name in checkpoints:
        completion = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0,
                                               extra_body={"ignore_eos": True})
        assert completion.model == name
        assert completion.choices[0].text == texts[name]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)


def test_metrics_and_stats_are_per_model(two_models: str, checkpoints: dict[str, Path]) -> None:
    client = openai.OpenAI(base_url=f"{two_models}/v1", api_key=API_KEY)
    client.completions.create(model="qwen-b", prompt=PROMPT, max_tokens=3)
    text = httpx.get(f"{two_models}/metrics", headers=auth()).text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    generated = {s.labels["model_name"]: s.value for s in families["vllm:generation_tokens"].samples
                 if s.name.endswith("_total")}
    assert set(generated) == set(checkpoints) and generated["qwen-b"] >= 3
    tokens = {s.labels["model_name"] for s in families["localmoe:expert_tokens"].samples}
    assert tokens == set(checkpoints)
    layers = {name: httpx.get(f"{two_models}/v1/stats/experts", params={"model": name}, headers=auth()).json()
              for name in checkpoints}
    assert len(layers["mixtral-a"]["layers"]) == 3 and len(layers["qwen-b"]["layers"]) == 2
    assert httpx.get(f"{two_models}/v1/stats/memory", params={"model": "nope"}, headers=auth()).status_code == 404


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_model_lists_in_the_config_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "vllm:\n  max_num_seqs: 8\nmodels:\n  - model_name: localmoe-builtin\n"
                                         "  - model_name: localmoe-builtin\n    served_model_name: b\n"
                                         "    max_num_seqs: 2\n"))
    assert [(e.served_model_name, e.max_num_seqs) for e in config.engines] == [(None, 8), ("b", 2)]
    # the original project's list: `name` is the served name
    config = load_config(write(tmp_path, "vllm_instances:\n  - name: small\n    model_name: localmoe-builtin\n"))
    assert [e.served_model_name for e in config.engines] == ["small"]
    for text, refused in (("models:\n  - model_name: localmoe-builtin\n  - model_name: localmoe-builtin\n",
                           "more than one model"),
                          ("models:\n  - served_model_name: x\n", "model_name is required"),
                          ("models:\n  - model_name: localmoe-builtin\n    colour: red\n", "unknown key"),
                          ("vllm_instances:\n  - name: a\n    model_name: localmoe-builtin\n    gpu_ids: [0]\n",
                           "no CUDA device 0"),
                          ("models: localmoe-builtin\n", "list of mappings")):
        with pytest.raises(ConfigError, match=refused):
            load_config(write(tmp_path, text))
    with pytest.raises(ConfigError, match="--model"):
        load_config(write(tmp_path, "models:\n  - model_name: localmoe-builtin\n"),
                    {"engine": {"model_name": "other"}})


ADMIN_KEY = "sk-localmoe-admin"


class SteadyStream:
    """Requests to one served name, one after another on a thread, until stopped: every answer is counted."""

    def __init__(self, url: str, model: str) -> None:
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
        self.model, self.ok, self.failed = model, 0, []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.client.completions.create(model=self.model, prompt=PROMPT, max_tokens=4)
                self.ok += 1
            except openai.OpenAIError as e:
                self.failed.append(e)

    def __enter__(self) -> "SteadyStream":
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stopping.set()
        self.thread.join(timeout=600)


def admin(url: str, route: str, body: dict, key: str = ADMIN_KEY) -> httpx.Response:
    return httpx.post(f"{url}/v1/models/{route}", json=body, timeout=600,
                      headers={"Authorization": f"Bearer {key}"})


def test_load_switch_and_unload_while_serving(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Load beside a served model, switch a served name to another checkpoint, unload: a steady stream of requests
    sees no failure; a switch to a broken checkpoint or to one that cannot fit changes nothing and says why."""
    settings = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    texts = {name: alone(path) for name, path in checkpoints.items()}
    with serve(tmp_path, "--model", str(checkpoints["mixtral-a"]), "--served-model-name", "a",
               "--admin-api-key", ADMIN_KEY, *settings) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY)

        def greedy(model: str) -> str:
            return client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text

        body = {"model_name": str(checkpoints["qwen-b"]), "served_model_name": "b"}
        assert admin(server.url, "load", body, key=API_KEY).status_code == 401  # the user key opens no admin route
        with SteadyStream(server.url, "a") as steady:
            answer = admin(server.url, "load", body)
            assert answer.status_code == 200, answer.text
        assert steady.failed == [] and steady.ok > 0
        assert [m.id for m in client.models.list().data] == ["a", "b"]
        assert greedy("b") == texts["qwen-b"] and greedy("a") == texts["mixtral-a"]

        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "config.json").write_text('{"architectures": ["NoSuchForCausalLM"], "model_type": "nope"}')
        with SteadyStream(server.url, "b") as steady:
            refused = admin(server.url, "switch", {"model_name": str(broken), "served_model_name": "b"})
            assert refused.status_code == 400 and "cannot load" in refused.json()["error"]["message"]
            too_big = admin(server.url, "switch", {"model_name": str(checkpoints["mixtral-a"]),
                                                   "served_model_name": "b", "kv_cache_memory": "4000GiB"})
            assert too_big.status_code == 507 and "nothing was changed" in too_big.json()["error"]["message"]
            moved = admin(server.url, "switch", {"model_name": str(checkpoints["mixtral-a"]),
                                                 "served_model_name": "b"})
            assert moved.status_code == 200, moved.text
            assert moved.json()["previous_model_name"] == str(checkpoints["qwen-b"])
        assert steady.failed == [] and steady.ok > 0
        assert greedy("b") == texts["mixtral-a"]  # the name moved to the other checkpoint

        with SteadyStream(server.url, "a") as steady:
            assert admin(server.url, "unload", {"served_model_name": "b"}).json()["state"] == "unloaded"
        assert steady.failed == []
        assert [m.id for m in client.models.list().data] == ["a"]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="b", prompt="x", max_tokens=1)
        metrics = httpx.get(f"{server.url}/metrics", headers=auth()).text
        assert 'vllm:num_requests_running{model_name="b"}' not in metrics
        assert admin(server.url, "unload", {"served_model_name": "a"}).status_code == 409  # the last one stays


def test_admin_routes_are_closed_without_an_admin_key() -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from localmoe.server.auth import APIKeyMiddleware

    inner = Starlette(routes=[Route(path, lambda _: PlainTextResponse("ok"), methods=["POST"])
                              for path in ("/v1/models/load", "/v1/completions")])
    for admin_key, user_status, admin_status in ((None, 200, 403), (ADMIN_KEY, 200, 200)):
        client = TestClient(APIKeyMiddleware(inner, API_KEY, admin_key, frozenset({"/v1/models/load"})))
        user = {"Authorization": f"Bearer {API_KEY}"}
        assert client.post("/v1/completions", headers=user).status_code == user_status
        assert client.post("/v1/models/load", headers=user).status_code in (401, 403)
        assert client.post("/v1/models/load", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code \
            == admin_status

"""Several models behind one endpoint (issue 19): a `models:` list in the config file, each model its own engine,
requests routed by `model`, every metric series labelled by model_name, statistics per model."""

from __future__ import annotations

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
                          ("vllm_instances:\n  - name: a\n    model_name: localmoe-builtin\n    port: 8001\n",
                           "port"),
                          ("models: localmoe-builtin\n", "list of mappings")):
        with pytest.raises(ConfigError, match=refused):
            load_config(write(tmp_path, text))
    with pytest.raises(ConfigError, match="--model"):
        load_config(write(tmp_path, "models:\n  - model_name: localmoe-builtin\n"),
                    {"engine": {"model_name": "other"}})

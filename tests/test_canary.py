"""Versions and canary traffic (issue 19): a served name with several versions shares its requests by weight, sticky
by a key the request carries; answers name the version, metrics are labelled by it, an admin changes the weights
at runtime. And the original's vllm_instances with a port of their own."""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from localmoe.config import ConfigError, load_config
import test_multi_model
from localmoe.server.canary import VERSION_HEADER, choose_version
from server_process import API_KEY, auth, free_port, serve
from test_multi_model import ADMIN_KEY, PROMPT, SETTINGS, admin, write

checkpoints = test_multi_model.checkpoints  # the same two checkpoints (a fixture), built for this module

WEIGHTS = [("stable", 90.0), ("canary", 10.0)]


def within_three_sigma(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 3 * math.sqrt(n * p * (1 - p))


def test_random_choices_follow_the_weights() -> None:
    rng = random.Random(0)
    for weights in (WEIGHTS, [("a", 5.0), ("b", 3.0), ("c", 2.0)]):
        drawn = Counter(choose_version(weights, None, rng) for _ in range(1000))
        total = sum(w for _, w in weights)
        assert all(within_three_sigma(drawn[v], 1000, w / total) for v, w in weights), drawn


def test_sticky_keys_follow_the_weights_and_stay_put() -> None:
    rng = random.Random(0)
    users = [f"user-{i}" for i in range(1000)]
    chosen = {user: choose_version(WEIGHTS, user, rng) for user in users}
    assert within_three_sigma(Counter(chosen.values())["canary"], 1000, 0.1)
    assert all(choose_version(WEIGHTS, user, rng) == version for user, version in chosen.items())
    # a larger canary takes keys from the stable version only, never the other way
    wider = {user: choose_version([("stable", 80.0), ("canary", 20.0)], user, rng) for user in users}
    assert all(wider[user] == "canary" for user, version in chosen.items() if version == "canary")
    assert within_three_sigma(Counter(wider.values())["canary"], 1000, 0.2)
    assert choose_version([("off", 0.0), ("on", 1.0)], "anyone", rng) == "on"


def test_versions_in_the_config_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "models:\n  - served_model_name: chat\n    max_num_seqs: 4\n    versions:\n"
                                         "      - {model_name: localmoe-builtin, version: stable, weight: 90}\n"
                                         "      - {model_name: localmoe-builtin, version: canary, weight: 10,"
                                         " max_num_seqs: 2}\n"
                                         "  - model_name: localmoe-builtin\n    served_model_name: other\n"))
    served = [(c.engine.served_model_name, c.engine.max_num_seqs, c.placement.version, c.placement.weight)
              for c in config.served()]
    assert served == [("chat", 4, "stable", 90.0), ("chat", 2, "canary", 10.0), ("other", 64, "default", 1.0)]
    entry = "models:\n  - served_model_name: chat\n    versions:\n"
    for text, refused in ((entry + "      - {model_name: localmoe-builtin, version: a, weight: 0}\n", "all 0"),
                          (entry + "      - {model_name: localmoe-builtin, version: a}\n"
                                   "      - {model_name: localmoe-builtin, version: a}\n", "more than one model"),
                          (entry + "      - {model_name: localmoe-builtin, weight: -1}\n", "weight"),
                          (entry + "      - {model_name: localmoe-builtin, version: ''}\n", "version"),
                          ("models:\n  - {model_name: localmoe-builtin, version: a, versions: []}\n", "versions"),
                          ("vllm_instances:\n  - {name: a, model_name: localmoe-builtin, port: http}\n", "port")):
        with pytest.raises(ConfigError, match=refused):
            load_config(write(tmp_path, text))


@pytest.fixture(scope="module")
def canary(checkpoints: dict[str, Path], tmp_path_factory):
    """`chat` served by two versions 90/10 (two different checkpoints, so a request routed to the wrong engine would
    show), and `solo` on a port of its own too, in the original's vllm_instances form."""
    directory = tmp_path_factory.mktemp("canary")
    port = free_port()
    config = write(directory, "vllm:\n" + "".join(f"  {k}: {v}\n" for k, v in SETTINGS.items()) +
                   f"vllm_instances:\n  - name: chat\n    versions:\n"
                   f"      - {{model_name: {checkpoints['mixtral-a']}, version: stable, weight: 90}}\n"
                   f"      - {{model_name: {checkpoints['qwen-b']}, version: canary, weight: 10}}\n"
                   f"  - {{name: solo, model_name: {checkpoints['qwen-b']}, port: {port}}}\n")
    with serve(directory, "--config", str(config), "--admin-api-key", ADMIN_KEY) as server:
        yield server.url, f"http://127.0.0.1:{port}"


def complete(url: str, headers: dict[str, str] | None = None, **body) -> httpx.Response:
    answer = httpx.post(f"{url}/v1/completions", headers={**auth(), **(headers or {})}, timeout=120,
                        json={"model": "chat", "prompt": PROMPT, "max_tokens": 1, **body})
    assert answer.status_code == 200, answer.text
    return answer


def successes(url: str) -> Counter:
    """Requests `chat` finished, by version (over every finish reason)."""
    text = httpx.get(f"{url}/metrics", headers=auth()).text
    counts: Counter = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "vllm:request_success_total" and s.labels["model_name"] == "chat":
                counts[s.labels["version"]] += int(s.value)
    return counts


def key_on(version: str, weights: list[tuple[str, float]] = WEIGHTS) -> str:
    """A sticky key that lands on `version`."""
    return next(key for key in (f"key-{i}" for i in range(1000))
                if choose_version(weights, key, random.Random()) == version)


def test_requests_share_out_by_weight_and_metrics_say_which_version(canary) -> None:
    url, _ = canary
    cards = httpx.get(f"{url}/v1/models", headers=auth()).json()["data"]
    assert [(v["version"], v["weight"]) for v in cards[0]["versions"]] == WEIGHTS
    before = successes(url)
    n = 200
    with httpx.Client(headers=auth(), timeout=120) as client:
        served = Counter(client.post(f"{url}/v1/completions", json={"model": "chat", "prompt": PROMPT,
                                                                    "max_tokens": 1}).headers[VERSION_HEADER]
                         for _ in range(n))
    assert set(served) <= {"stable", "canary"} and within_three_sigma(served["canary"], n, 0.1), served
    assert successes(url) - before == served  # every metric series is labelled by the version that served
    text = httpx.get(f"{url}/metrics", headers=auth()).text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert {(s.labels["model_name"], s.labels["version"]) for s in families["vllm:generation_tokens"].samples} \
        == {("chat", "stable"), ("chat", "canary"), ("solo", "default")}


def test_a_key_makes_the_choice_sticky_and_the_answer_names_the_version(canary) -> None:
    url, own = canary
    greedy = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}
    solo = httpx.post(f"{own}/v1/completions", headers=auth(), json={"prompt": PROMPT, **greedy}).json()
    texts = {}
    for version in ("stable", "canary"):
        user = key_on(version)
        answers = [complete(url, user=user, **greedy) for _ in range(3)]
        answers += [complete(url, {"X-Session-Id": user}, **greedy), complete(url, {"X-User": user}, **greedy)]
        assert {a.headers[VERSION_HEADER] for a in answers} == {version}
        (texts[version],) = {a.json()["choices"][0]["text"] for a in answers}
        with httpx.stream("POST", f"{url}/v1/chat/completions", headers={**auth(), "X-Session-Id": user},
                          json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                "stream": True}, timeout=120) as stream:
            assert stream.status_code == 200 and stream.headers[VERSION_HEADER] == version
            assert list(stream.iter_lines())[-2] == "data: [DONE]"
    # each version's own engine answered: the canary's checkpoint is solo's, the stable one's another
    assert texts["canary"] == solo["choices"][0]["text"] != texts["stable"]


def test_an_instance_port_serves_its_model_alone(canary) -> None:
    url, own = canary
    assert [card["id"] for card in httpx.get(f"{own}/v1/models", headers=auth()).json()["data"]] == ["solo"]
    answer = httpx.post(f"{own}/v1/completions", headers=auth(), json={"prompt": PROMPT, "max_tokens": 2})
    assert answer.json()["model"] == "solo"
    elsewhere = httpx.post(f"{own}/v1/completions", headers=auth(), json={"model": "chat", "prompt": PROMPT})
    assert elsewhere.status_code == 404
    assert httpx.post(f"{url}/v1/completions", headers=auth(), json={"prompt": PROMPT, "max_tokens": 2}) \
        .json()["model"] == "chat"  # the shared port's default is the first model, as before


def test_weights_change_at_runtime_by_admin_only(canary) -> None:
    url, _ = canary
    body = {"served_model_name": "chat", "weights": {"stable": 0, "canary": 1}}
    assert admin(url, "weights", body, key=API_KEY).status_code == 401
    for bad, status in (({"nightly": 1}, 400), ({"stable": 0, "canary": 0}, 400), ({"canary": -1}, 400)):
        refused = admin(url, "weights", {"served_model_name": "chat", "weights": bad})
        assert refused.status_code == status, refused.text
    assert admin(url, "weights", {"served_model_name": "nope", "weights": {}}).status_code == 404
    moved = admin(url, "weights", body)
    assert moved.status_code == 200 and moved.json()["weights"] == {"stable": 0.0, "canary": 1.0}
    assert {complete(url).headers[VERSION_HEADER] for _ in range(20)} == {"canary"}
    assert complete(url, user=key_on("stable")).headers[VERSION_HEADER] == "canary"  # a key follows the weights
    cards = httpx.get(f"{url}/v1/models", headers=auth()).json()["data"]
    assert [(v["version"], v["weight"]) for v in cards[0]["versions"]] == [("stable", 0.0), ("canary", 1.0)]


def test_a_version_loads_beside_the_others_and_unloads_alone(canary, checkpoints) -> None:
    url, _ = canary
    body = {"model_name": str(checkpoints["mixtral-a"]), "served_model_name": "chat", "version": "nightly"}
    loaded = admin(url, "load", body)
    assert loaded.status_code == 200 and loaded.json()["weight"] == 0  # dark until given a weight
    assert admin(url, "load", body).status_code == 409
    cards = httpx.get(f"{url}/v1/models", headers=auth()).json()["data"]
    assert [v["version"] for v in cards[0]["versions"]] == ["stable", "canary", "nightly"]
    assert admin(url, "weights", {"served_model_name": "chat", "weights": {"nightly": 5}}).status_code == 200
    assert complete(url, user=key_on("nightly", [("stable", 0), ("canary", 1), ("nightly", 5)])) \
        .headers[VERSION_HEADER] == "nightly"
    unloaded = admin(url, "unload", {"served_model_name": "chat", "version": "nightly"})
    assert unloaded.status_code == 200 and unloaded.json()["versions"] == ["nightly"]
    assert {complete(url).headers[VERSION_HEADER] for _ in range(5)} == {"canary"}
    text = httpx.get(f"{url}/metrics", headers=auth()).text
    running = next(f for f in text_string_to_metric_families(text) if f.name == "vllm:num_requests_running")
    assert {s.labels["version"] for s in running.samples} == {"stable", "canary", "default"}  # its engine's went

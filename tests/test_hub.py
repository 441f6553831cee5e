"""Hub ids (`--model ORG/NAME`): downloaded by huggingface_hub into its cache where the network allows, served
from the cache offline.

The hub here is a local HTTP server answering the hub's API for one tiny repository (HF_ENDPOINT points at it, as
for a mirror), so the cache is written by huggingface_hub's own download code in its own layout; every test after
that runs offline (HF_HUB_OFFLINE=1, and HF_ENDPOINT at a closed port).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
import huggingface_hub
import pytest

from localmoe.config import ConfigError, load_config
from localmoe.llm import LLM
from localmoe.models.hub import is_hub_id
from localmoe.sampling_params import SamplingParams
from checkpoints import make_checkpoint
from server_process import REPO, SMALL_KV, auth, free_port, serve

REPO_ID = "localmoe-test/tiny-mixtral"
COMMIT = hashlib.sha1(b"localmoe-test").hexdigest()
PROMPT = "Once upon"
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
ENGINE_ARGS = ("--dtype", "float32", *SMALL_KV)
HUB_VARIABLES = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_TOKEN")
# what a hub repository holds beside the checkpoint, which the loader never reads
NOT_SERVED = {"pytorch_model.bin": b"torch", "consolidated.safetensors": b"mistral's format", "README.md": b"# tiny",
              "original/params.json": b"{}"}


@dataclass
class FakeHub:
    """The hub's API for one repository at one commit: repo info, file tree, and each file's HEAD and GET."""

    files: dict[str, bytes]
    fetched: list[str] = field(default_factory=list)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                self.answer(body=False)

            def do_GET(self) -> None:
                self.answer(body=True)

            def answer(self, body: bool) -> None:
                path = unquote(urlparse(self.path).path)
                resolve = f"/{REPO_ID}/resolve/{COMMIT}/"
                if path.startswith(f"/api/models/{REPO_ID}/revision/"):
                    self.send(json.dumps({"id": REPO_ID, "sha": COMMIT,
                                          "siblings": [{"rfilename": name} for name in hub.files]}).encode())
                elif path.startswith(f"/api/models/{REPO_ID}/tree/{COMMIT}"):
                    self.send(json.dumps([{"type": "file", "path": name, "size": len(data), "oid": _oid(data)}
                                          for name, data in hub.files.items()]).encode())
                elif path.startswith(resolve) and path[len(resolve):] in hub.files:
                    data = hub.files[path[len(resolve):]]
                    if body:
                        hub.fetched.append(path[len(resolve):])
                    self.send(data, body, {"X-Repo-Commit": COMMIT, "ETag": f'"{_oid(data)}"'})
                else:
                    self.send(b'{"error": "Repository not found"}', body, {"X-Error-Code": "RepoNotFound"}, 404)

            def send(self, data: bytes, body: bool = True, headers: dict[str, str] | None = None,
                     status: int = 200) -> None:
                self.send_response(status)
                for name, value in {"Content-Length": str(len(data)), **(headers or {})}.items():
                    self.send_header(name, value)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        return Handler


def _oid(data: bytes) -> str:
    """git's blob id, which the hub gives as a regular file's ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HubCache:
    home: Path  # HF_HOME; the cache is home/"hub"
    fetched: list[str]  # files the hub served
    text: str  # what `localmoe generate` printed for PROMPT, greedy, from the downloaded model

    def offline_env(self) -> dict[str, str]:
        return {"HF_HOME": str(self.home), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}


def localmoe(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The command with this environment's hub settings replaced by `env`'s."""
    own = {k: v for k, v in os.environ.items() if k not in HUB_VARIABLES}
    return subprocess.run([sys.executable, "-m", "localmoe.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**own, "PYTHONPATH": str(REPO), **env})


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory) -> Path:
    """tiny_mixtral_dir's model (the same seed) in safetensors shards with an index, as hub repositories hold it."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny-mixtral-sharded"), "mixtral", seed=0, max_shard_size="200KB")


@pytest.fixture(scope="module")
def hub_cache(sharded_dir: Path, tmp_path_factory) -> Iterator[HubCache]:
    """HF_HOME after `localmoe generate --model ORG/NAME` downloaded the tiny model from the hub."""
    hub = FakeHub({**{p.name: p.read_bytes() for p in sharded_dir.iterdir()}, **NOT_SERVED})
    server = ThreadingHTTPServer(("127.0.0.1", 0), hub.handler())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    home = tmp_path_factory.mktemp("hf-home")
    try:
        run = localmoe("generate", PROMPT, "--model", REPO_ID, "--temperature", "0", "--max-tokens", "8",
                       "--ignore-eos", *ENGINE_ARGS,
                       env={"HF_HOME": str(home), "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}"})
    finally:
        server.shutdown()
        server.server_close()
    if run.returncode != 0:
        pytest.fail(f"localmoe generate --model {REPO_ID} exited {run.returncode}:\n{run.stderr}")
    yield HubCache(home, hub.fetched, run.stdout.removesuffix("\n"))


@pytest.fixture(scope="module")
def expected_text(tiny_mixtral_dir: Path) -> str:
    """The same prompt on the same model loaded from its directory."""
    llm = LLM(model=str(tiny_mixtral_dir), dtype="float32", kv_cache_memory=SMALL_KV[1])
    return llm.generate([PROMPT], GREEDY)[0].outputs[0].text


def test_a_hub_id_is_downloaded_into_the_hub_cache_with_only_what_the_loader_reads(hub_cache: HubCache,
                                                                                    sharded_dir: Path,
                                                                                    expected_text: str) -> None:
    assert hub_cache.text == expected_text
    checkpoint = {p.name for p in sharded_dir.iterdir()}
    assert len([name for name in checkpoint if name.endswith(".safetensors")]) > 1
    assert sorted(hub_cache.fetched) == sorted(checkpoint)
    (repo,) = huggingface_hub.scan_cache_dir(hub_cache.home / "hub").repos
    assert repo.repo_id == REPO_ID and repo.refs["main"].commit_hash == COMMIT
    assert {f.file_name for f in repo.refs["main"].files} == checkpoint


def test_serve_by_hub_id_offline_from_the_cache(hub_cache: HubCache, expected_text: str, tmp_path: Path) -> None:
    with serve(tmp_path, "--model", REPO_ID, *ENGINE_ARGS, env=hub_cache.offline_env()) as server:
        models = httpx.get(f"{server.url}/v1/models", headers=auth()).json()["data"]
        assert [m["id"] for m in models] == [REPO_ID]
        answer = httpx.post(f"{server.url}/v1/completions", headers=auth(), timeout=120, json={
            "model": REPO_ID, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}).json()
        assert answer["choices"][0]["text"] == expected_text


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 for this process (huggingface_hub reads the variable once, at import)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_python_api_offline_with_download_dir(hub_cache: HubCache, tiny_mixtral_dir: Path, expected_text: str,
                                              offline: None) -> None:
    cache = str(hub_cache.home / "hub")
    for model, tokenizer, revision in ((REPO_ID, None, None), (REPO_ID, None, COMMIT),
                                       (str(tiny_mixtral_dir), REPO_ID, None)):
        llm = LLM(model=model, tokenizer=tokenizer, revision=revision, download_dir=cache, dtype="float32",
                  kv_cache_memory=SMALL_KV[1])
        assert llm.engine.model_name == model
        assert llm.generate([PROMPT], GREEDY)[0].outputs[0].text == expected_text


def test_a_missing_hub_id_offline_says_it_is_not_in_the_cache_and_downloads_are_off(hub_cache: HubCache,
                                                                                   tmp_path: Path) -> None:
    run = localmoe("serve", "--model", "localmoe-test/no-such-model", env=hub_cache.offline_env())
    assert run.returncode == 2, run.stderr
    message = " ".join(run.stderr.split())
    assert "localmoe-test/no-such-model: not found in the cache" in message
    assert "downloads are off (HF_HUB_OFFLINE=1)" in message and str(hub_cache.home / "hub") in message
    assert "Traceback" not in run.stderr


def test_a_revision_not_in_the_cache_and_a_tokenizer_id_missing_are_named(hub_cache: HubCache,
                                                                         tiny_mixtral_dir: Path,
                                                                         offline: None) -> None:
    cache = str(hub_cache.home / "hub")
    with pytest.raises(ConfigError, match=f"{REPO_ID} \\(revision v2\\): not found in the cache .* downloads are off"):
        load_config(None, {"engine": {"model_name": REPO_ID, "revision": "v2", "download_dir": cache}})
    with pytest.raises(ConfigError, match="localmoe-test/no-tokenizer: not found in the cache"):
        load_config(None, {"engine": {"model_name": str(tiny_mixtral_dir), "tokenizer": "localmoe-test/no-tokenizer",
                                      "download_dir": cache}})


def test_a_snapshot_missing_a_shard_offline_says_so(hub_cache: HubCache, tmp_path: Path, offline: None) -> None:
    cache = tmp_path / "hub"
    shutil.copytree(hub_cache.home / "hub", cache, symlinks=True)
    (shard,) = (cache / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / COMMIT).glob("model-00002-*")
    shard.unlink()
    with pytest.raises(ConfigError, match=f"in the cache \\({cache}\\) lacks files, and downloads are off"):
        load_config(None, {"engine": {"model_name": REPO_ID, "download_dir": str(cache)}})


def test_hub_options_are_refused_for_local_models(tiny_mixtral_dir: Path) -> None:
    for key, value in (("revision", "main"), ("tokenizer_revision", "main"), ("download_dir", "/tmp")):
        with pytest.raises(ConfigError, match=f"^{key}: "):
            load_config(None, {"engine": {"model_name": str(tiny_mixtral_dir), key: value}})


def test_what_counts_as_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints" / "mine").mkdir(parents=True)
    assert is_hub_id("mistralai/Mixtral-8x7B-v0.1")
    assert not any(is_hub_id(name) for name in ("checkpoints/mine", "/abs/dir", "mine", "a/b/c", "", None,
                                                "./x", "org/bad name"))


def test_plan_reads_a_hub_ids_config_from_the_cache(hub_cache: HubCache, tiny_mixtral_dir: Path) -> None:
    run = localmoe("plan", REPO_ID, "--json", env=hub_cache.offline_env())
    assert run.returncode == 0, run.stderr
    local = localmoe("plan", str(tiny_mixtral_dir), "--json", env={})
    assert json.loads(run.stdout)["params"] == json.loads(local.stdout)["params"]
    run = localmoe("plan", "localmoe-test/no-such-model", env=hub_cache.offline_env())
    assert run.returncode == 2 and "not found in the cache" in run.stderr

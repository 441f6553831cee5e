"""The Ray executor on a two-node Ray cluster on this machine (a head with resource node_a and a second node with
node_b, one CPU each, on a loopback address): `localmoe serve --tensor-parallel-size 2
--distributed-executor-backend ray` puts rank 0's bundle on the engine core's node and rank 1's actor on the other,
serves the single process's greedy tokens and log-probabilities through the openai client, and a killed worker
actor ends the stream in flight with an error and turns /health 503 within seconds. No Ray process outlives the
module; a cluster too small for the ranks is refused at once."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import openai
import psutil
import pytest
import ray
from pytest import approx

from checkpoints import make_checkpoint
from family_parity import TOL, engine
from localmoe import SamplingParams
from server_process import API_KEY, REPO, SMALL_KV, ServerProcess, free_port, serve
from test_tensor_parallel import NEW, SETTINGS, kill_during_a_stream

# Ray turns 127.0.0.1 into the machine's outward address (it refuses a loopback cluster of several nodes);
# another loopback address keeps the cluster on this machine
LOOPBACK = "127.0.0.2"
PROMPTS = ["The tensor-parallel engine", "Mixture of experts, split over ranks"]


def ray_command(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, f"ray {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


def ray_processes(temp_dir: str) -> list[psutil.Process]:
    """The cluster's processes: its daemons name its temp dir, its workers' titles start with ray::."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if temp_dir in command or command.startswith("ray::"):
            found.append(process)
    return found


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A head (node_a) and a second node (node_b) on this machine; yields the head's address. Its workers import
    this checkout."""
    temp_dir = tempfile.mkdtemp(prefix="lmray", dir="/tmp")  # short: Ray's socket paths live under it
    address = f"{LOOPBACK}:{free_port()}"
    # the cluster, the server and this process (a Ray driver too) share these; Ray turns token authentication on
    # for a head started where a token file exists (~/.ray/auth_token, left by any local ray.init)
    env = {"PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    # a small object store: the engine passes nothing through it
    node = ["--node-ip-address", LOOPBACK, "--num-cpus", "1", "--object-store-memory", str(100 * 2**20)]
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        patch.delenv("RAY_ADDRESS", raising=False)
        try:
            ray_command("start", "--head", "--port", address.rsplit(":", 1)[1], *node, "--resources",
                        '{"node_a": 1}', "--include-dashboard=false", "--temp-dir", temp_dir)
            ray_command("start", "--address", address, *node, "--resources", '{"node_b": 1}')
            yield address
        finally:
            started = ray_processes(temp_dir)
            ray_command("stop", "--force")
            psutil.wait_procs(started, timeout=15)
            left = [p for p in ray_processes(temp_dir) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            shutil.rmtree(temp_dir, ignore_errors=True)
            assert not left, f"Ray processes outlived the cluster: {left}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("mixtral"), "mixtral", seed=5, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def server(cluster, checkpoint, tmp_path_factory) -> Iterator[ServerProcess]:
    flags = [f"--{key.replace('_', '-')}" if value is True else f"--{key.replace('_', '-')}={value}"
             for key, value in SETTINGS.items()]
    with serve(tmp_path_factory.mktemp("logs"), "--model", str(checkpoint), "--dtype", "float32", "--block-size",
               "4", *SMALL_KV, "--tensor-parallel-size", "2", "--distributed-executor-backend", "ray", *flags,
               env={"RAY_ADDRESS": cluster}) as server:
        yield server


def node_ids(address: str) -> dict[str, str]:
    """node_a's and node_b's Ray node ids, and where each bundle of the server's placement group landed."""
    ray.init(address=address, log_to_driver=False)
    try:
        nodes = {resource: node["NodeID"] for node in ray.nodes() if node["Alive"]
                 for resource in ("node_a", "node_b") if resource in node["Resources"]}
        groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
    finally:
        ray.shutdown()
    assert len(groups) == 1
    return {**nodes, **{f"bundle {i}": node for i, node in groups[0]["bundles_to_node_id"].items()}}


def test_served_over_two_nodes_equals_one_process(cluster, checkpoint, server):
    placed = node_ids(cluster)
    # rank 0's bundle on the engine core's node (the head, where the server's driver attached), rank 1's on the
    # other
    assert placed["bundle 0"] == placed["node_a"] and placed["bundle 1"] == placed["node_b"]
    expected = engine(checkpoint, **SETTINGS).generate(
        PROMPTS, SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, logprobs=1))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    served = client.completions.create(model=client.models.list().data[0].id, prompt=PROMPTS, max_tokens=NEW,
                                       temperature=0, logprobs=1, extra_body={"ignore_eos": True})
    for choice, want in zip(sorted(served.choices, key=lambda c: c.index), expected):
        assert choice.text == want.outputs[0].text
        assert len(choice.logprobs.tokens) == NEW
        theirs = [next(iter(d.values())).logprob for d in want.outputs[0].logprobs]
        assert choice.logprobs.token_logprobs == approx(theirs, abs=TOL)


def test_a_killed_worker_fails_the_stream_and_health(cluster, server):
    placed = node_ids(cluster)
    workers = [p for p in psutil.process_iter(["cmdline"])
               if " ".join(p.info["cmdline"] or []).startswith("ray::RankActor")]
    assert len(workers) == 1
    # the actor's process is a worker of node_b's raylet
    assert f"--node_id={placed['node_b']}" in workers[0].parent().cmdline()
    kill_during_a_stream(server, openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0),
                         workers[0].pid)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0


def test_a_cluster_too_small_is_refused_at_once(cluster, checkpoint, monkeypatch):
    """Three ranks of one CPU each on a cluster of two CPUs: refused before any placement, naming what is
    missing (not after the placement timeout)."""
    monkeypatch.setenv("RAY_ADDRESS", cluster)
    try:
        with pytest.raises(RuntimeError, match=r"tensor_parallel_size 3 needs \{'CPU': 3\} of the Ray cluster"):
            engine(checkpoint, tensor_parallel_size=3, distributed_executor_backend="ray")
    finally:
        ray.shutdown()

"""A real `localmoe serve` process for end-to-end tests: started on a free loopback port, ready when /health
answers (never after a fixed sleep), stopped with SIGTERM."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

API_KEY = "sk-localmoe-test"
REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 600  # only against a hang: a busy CI machine may be building the CPU kernels first
SMALL_KV = ("--kv-cache-memory", str(64 * 2**20))  # a pool that is quick to allocate, for servers of small models


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


@contextmanager
def serve(log_dir: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """`localmoe serve ARGS` with the test API key; yields once /health answers 200."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    command = [sys.executable, "-m", "localmoe.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--api-key", API_KEY, "--log-level", "warning", *args]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    server = ServerProcess(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not healthy(server.url):
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}:\n{server.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"server did not become healthy:\n{server.log()}")
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def healthy(url: str, path: str = "/health") -> bool:
    try:
        return httpx.get(f"{url}{path}", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def scrape(base_url: str) -> dict[str, float]:
    """Every sample on /metrics, keyed by name (labels dropped: one model, one value each)."""
    text = httpx.get(f"{base_url}/metrics", headers=auth()).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if "finished_reason" not in s.labels and "le" not in s.labels}



def rejected(base_url: str) -> dict[str, float]:
    """localmoe:requests_rejected_total by the status answered ("503", "429")."""
    text = httpx.get(f"{base_url}/metrics", headers=auth()).text
    return {s.labels["status"]: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "localmoe:requests_rejected_total"}
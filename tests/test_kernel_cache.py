"""The CPU kernels' build cache (layers/cpu_kernels.py): keyed by what the library depends on, never blocked by a
build that died."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from localmoe.layers import cpu_kernels
from localmoe.layers.cpu_kernels import cpu_has_avx512_bf16
from server_process import SMALL_KV, auth, serve

ROOT = Path(__file__).resolve().parents[1]
# a process taking the build flock, then touching torch's lock file as the build it stands for would
HOLD = """import fcntl, pathlib, sys, time
lock = open(sys.argv[1], "w")
fcntl.flock(lock, fcntl.LOCK_EX)
(pathlib.Path(sys.argv[1]).parent / sys.argv[2]).touch()
print("locked", flush=True)
time.sleep(600)
"""
WHERE = "from localmoe.layers.cpu_kernels import cache_dir; print(cache_dir())"
LOAD = """import logging, sys
logging.basicConfig(level=logging.INFO)
from localmoe.layers.cpu_kernels import kernels
sys.exit(kernels() is None)
"""


def test_the_key_changes_with_the_sources_torch_and_the_cpu(tmp_path, monkeypatch):
    copies = []
    for path in cpu_kernels.SOURCES + cpu_kernels.HEADERS:
        copies.append(tmp_path / path.name)
        copies[-1].write_bytes(path.read_bytes())
    monkeypatch.setattr(cpu_kernels, "SOURCES", copies[:len(cpu_kernels.SOURCES)])
    monkeypatch.setattr(cpu_kernels, "HEADERS", copies[len(cpu_kernels.SOURCES):])
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: "fpu avx512f avx512_bf16")
    monkeypatch.setattr(cpu_kernels, "compiler_version", lambda: "c++ 12.2.0")
    base = cpu_kernels.cache_key()
    assert cpu_kernels.cache_key() == base
    keys = [base]
    for source in (copies[1], tmp_path / "tensor_args.h"):
        text = source.read_text()
        source.write_text(text + "// an edit\n")
        keys.append(cpu_kernels.cache_key())
        source.write_text(text)
    assert cpu_kernels.cache_key() == base
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    keys.append(cpu_kernels.cache_key())
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: "fpu avx512f")  # another CPU: -march=native differs
    keys.append(cpu_kernels.cache_key())
    monkeypatch.setattr(cpu_kernels, "compiler_version", lambda: "c++ 13.1.0")
    keys.append(cpu_kernels.cache_key())
    assert len(set(keys)) == len(keys)


def test_the_cache_lies_under_its_variable_else_the_xdg_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "cache_key", lambda: "key")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("LOCALMOE_KERNEL_CACHE", raising=False)
    assert cpu_kernels.cache_dir() == tmp_path / "xdg" / "localmoe" / "kernels" / "key"
    monkeypatch.setenv("LOCALMOE_KERNEL_CACHE", str(tmp_path / "ours"))
    assert cpu_kernels.cache_dir() == tmp_path / "ours" / "key"
    assert (tmp_path / "ours" / "key").is_dir()


def load_kernels_in_a_new_process() -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LOAD], cwd=ROOT, capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
@pytest.mark.avx512_bf16
@pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="needs a CPU with AVX512-BF16")
def test_a_build_killed_midway_does_not_block_the_next_process(tmp_path, monkeypatch):
    """The killed builder leaves torch's lock file behind (on which torch's own cache waited forever); its flock
    went with it. The next server builds (a real build, minutes on 2 cores) and serves; a process after it loads
    the build."""
    monkeypatch.setenv("LOCALMOE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.delenv("LOCALMOE_CPU_KERNELS", raising=False)
    directory = Path(subprocess.run([sys.executable, "-c", WHERE], cwd=ROOT, capture_output=True, text=True,
                                    check=True, timeout=600).stdout.strip())  # as the server will compute it
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(directory / cpu_kernels.BUILD_LOCK),
                               cpu_kernels.TORCH_BATON], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert (directory / cpu_kernels.TORCH_BATON).exists()

    # the next `localmoe serve` builds the kernels before it reports ready, then serves on them
    with serve(tmp_path, "--log-level", "info", *SMALL_KV, env={"LOCALMOE_KERNEL_CACHE": str(tmp_path)}) as server:
        response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "built", "max_tokens": 4},
                              headers=auth(), timeout=300)
        assert response.status_code == 200, response.text
        assert "CPU kernels built in" in server.log() and str(directory) in server.log()
    second = load_kernels_in_a_new_process()
    assert second.returncode == 0, second.stderr
    assert f"CPU kernels loaded from {directory}" in second.stderr and "CPU kernels built" not in second.stderr

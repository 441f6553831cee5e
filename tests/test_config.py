"""Configuration: the YAML file's shape, its refusals, and command-line flags on top of it."""

from __future__ import annotations

import importlib.util
from dataclasses import fields
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from localmoe import cli
from localmoe.config import Config, ConfigError, EngineConfig, load_config

FILE = """
model:
  num_experts: 4
{section}:
  model_name: /models/tiny
  max_num_seqs: 8
  block_size: 32
  max_model_len: 1024
  enable_prefix_caching: true
server:
  port: 9001
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("section", ["vllm", "engine"])
def test_engine_section_loads_under_either_name(tmp_path: Path, section: str) -> None:
    config = load_config(write(tmp_path, FILE.format(section=section)))
    assert config.engine.model_name == "/models/tiny"
    assert (config.engine.max_num_seqs, config.engine.block_size, config.engine.max_model_len) == (8, 32, 1024)
    assert config.model.num_experts == 4 and config.server.port == 9001


def test_shipped_config_loads() -> None:
    config = load_config()
    assert config.engine.tensor_parallel_size == 1 and config.server.api_key is None


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_num_seqz"):
        load_config(write(tmp_path, "vllm:\n  max_num_seqz: 3\n"))


def test_ray_executor_without_ray_is_refused_with_a_reason(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_config(write(tmp_path, "vllm:\n  tensor_parallel_size: 4\n")).engine.tensor_parallel_size == 4
    path = write(tmp_path, "vllm:\n  tensor_parallel_size: 2\n  distributed_executor_backend: ray\n")
    assert load_config(path).engine.distributed_executor_backend == "ray"
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "ray" else
                        find_spec(name, *args))
    with pytest.raises(ConfigError, match=r"distributed_executor_backend: the ray backend needs Ray: pip install"):
        load_config(path)


@pytest.mark.parametrize("text, key, reason", [
    ("model:\n  quantization_type: int3\n", "quantization_type", "is not one of"),
    ("model:\n  enable_compilation: true\n", "enable_compilation", "not available")])
def test_model_keys_that_cannot_be_honoured_are_refused(tmp_path: Path, text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=f"model.{key}: .*{reason}"):
        load_config(write(tmp_path, text))


def test_trust_remote_code_reaches_the_tokenizer(tiny_mixtral_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from localmoe.engine import llm_engine

    seen = []
    real = llm_engine.AutoTokenizer.from_pretrained
    monkeypatch.setattr(llm_engine.AutoTokenizer, "from_pretrained",
                        lambda path, **kwargs: seen.append(kwargs["trust_remote_code"]) or real(path, **kwargs))
    for trust in (False, True):
        llm_engine.load_tokenizer(tiny_mixtral_dir, {"model_type": "mixtral"}, trust)
    assert seen == [False, True]


def serve_config(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> Config:
    """Parse `localmoe serve ARGS` exactly as the console does, stopping short of loading a model."""
    seen: list[Config] = []
    monkeypatch.setattr(cli, "run_server", seen.append)
    result = CliRunner().invoke(cli.app, ["serve", *args])
    assert result.exit_code == 0, result.output
    return seen[0]


def test_flags_override_the_file_and_unset_flags_do_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, FILE.format(section="vllm"))
    config = serve_config(monkeypatch, ["--config", str(path), "--max-num-seqs", "3", "--no-enable-prefix-caching",
                                        "--model", "/models/other", "--port", "9100", "--api-key", "k",
                                        "--dtype", "float32"])
    engine = config.engine
    assert (engine.max_num_seqs, engine.enable_prefix_caching, engine.model_name, engine.dtype) == (
        3, False, "/models/other", "float32")
    assert (engine.block_size, engine.max_model_len) == (32, 1024)  # from the file: no flag given
    assert (config.server.port, config.server.api_key, config.server.host) == (9100, "k", "127.0.0.1")
    assert config.model.num_experts == 4

    untouched = serve_config(monkeypatch, ["--config", str(path)])
    assert untouched == load_config(path)


def test_every_engine_key_has_a_flag() -> None:
    serve = typer.main.get_command(cli.app).commands["serve"]
    options = {name for param in serve.params for name in param.opts + param.secondary_opts}
    for f in fields(EngineConfig):
        assert cli.engine_flag(f.name) in options
    assert {"--model", "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens", "--gpu-memory-utilization",
            "--enable-prefix-caching", "--no-enable-prefix-caching", "--tensor-parallel-size", "--kv-cache-memory",
            "--served-model-name", "--api-key", "--config"} <= options


def test_refused_flag_exits_2_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "run_server", lambda config: pytest.fail("must not start"))
    result = CliRunner().invoke(cli.app, ["serve", "--tensor-parallel-size", "2", "--distributed-executor-backend",
                                          "threads"])
    assert result.exit_code == 2
    assert "distributed_executor_backend" in result.output


def test_memory_sizes_take_units_and_auto_only_where_it_means_something(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("vllm:\n  kv_cache_memory: 512MiB\n  expert_cache_memory: 1.5G\n")
    engine = load_config(path).engine
    assert (engine.kv_cache_bytes, engine.expert_cache_bytes) == (512 * 2**20, 3 * 2**29)
    assert EngineConfig(kv_cache_memory=67108864).kv_cache_bytes == 2**26  # YAML gives plain numbers as ints
    assert EngineConfig(expert_cache_memory="auto").expert_cache_bytes == "auto"
    for text, key in (("kv_cache_memory: auto", "kv_cache_memory"), ("expert_cache_memory: 0", "expert_cache_memory"),
                      ("expert_cache_memory: 4 parsecs", "expert_cache_memory")):
        path.write_text(f"vllm:\n  {text}\n")
        with pytest.raises(ConfigError, match=key):
            load_config(path)

"""The `localmoe` command: errors a user can act on, and offline generation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import typer
from typer.testing import CliRunner

from localmoe import cli
from localmoe.config import EngineConfig, ServerConfig
from localmoe.llm import LLM
from localmoe.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parent.parent


def test_serve_with_an_unknown_key_exits_2_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("vllm:\n  max_num_seqz: 3\n")
    run = subprocess.run([sys.executable, "-m", "localmoe.cli", "serve", "--config", str(bad)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "max_num_seqz" in run.stderr
    assert "Traceback" not in run.stderr + run.stdout


def test_generate_prints_the_generated_text(tiny_mixtral_dir: Path) -> None:
    engine_args = ["--model", str(tiny_mixtral_dir), "--dtype", "float32", "--kv-cache-memory", "64000000"]
    result = CliRunner().invoke(cli.app, ["generate", "Once upon", *engine_args, "--temperature", "0",
                                          "--max-tokens", "8", "--ignore-eos"])
    assert result.exit_code == 0, result.output
    llm = LLM(model=str(tiny_mixtral_dir), dtype="float32", kv_cache_memory=64_000_000)
    expected = llm.generate(["Once upon"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert result.stdout == expected[0].outputs[0].text + "\n"


def test_unsupported_architecture_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"]}))
    for command in (["generate", "hi"], ["serve"]):
        result = CliRunner().invoke(cli.app, [*command, "--model", str(tmp_path)])
        assert result.exit_code == 1, result.output
        assert "FooForCausalLM" in result.output and "MixtralForCausalLM" in result.output
        assert isinstance(result.exception, SystemExit)


def test_plan_command_prints_json_and_refuses_unknown_models() -> None:
    result = CliRunner().invoke(cli.app, ["plan", "Mixtral-8x7B", "--device", "H100-80GB", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["parallel_degree"] == 2
    result = CliRunner().invoke(cli.app, ["plan", "no-such-model"])
    assert result.exit_code == 2 and "known model" in result.output


def help_blocks(command: str, columns: int) -> dict[str, str]:
    """`localmoe COMMAND --help` as a real terminal of `columns` shows it: each option's first name -> its text,
    wrapped lines joined."""
    run = subprocess.run([sys.executable, "-m", "localmoe.cli", command, "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "COLUMNS": str(columns)})
    assert run.returncode == 0, run.stderr
    blocks: dict[str, str] = {}
    name = None
    for line in run.stdout.splitlines():
        if line.startswith("  --"):
            name = line.split()[0]
            blocks[name] = line
        elif name is not None and line.startswith("    "):
            blocks[name] += line
    assert all(len(line) <= columns for line in run.stdout.splitlines())
    return {name: " ".join(text.split()) for name, text in blocks.items()}


def test_every_serve_flag_is_explained_with_its_default_and_whole_at_80_columns() -> None:
    blocks = help_blocks("serve", 80)
    flags = {cli.engine_flag(f.name): f for f in fields(EngineConfig)}
    flags |= {"--" + f.name.replace("_", "-"): f for f in fields(ServerConfig)}
    assert set(flags) <= set(blocks), set(flags) - set(blocks)
    for flag, f in flags.items():
        text = blocks[flag].split(None, 1)[1]
        assert "Sets vllm" not in text and len(text) > 40, f"{flag}: give {f.name} setting(default, help) in config.py"
        if f.default not in (None, ""):
            assert f"[default: {f.default}]" in text, (flag, text)
    assert "configs/config.yaml" in blocks["--config"]


def test_every_flag_of_every_command_says_what_it_does() -> None:
    command = typer.main.get_command(cli.app)
    for name, sub in command.commands.items():
        for param in sub.params:
            assert param.help and len(param.help) > 15, (name, param.name, param.help)
        for flag in help_blocks(name, 80):
            assert flag.lstrip("-").replace("-", "").isalnum(), (name, flag)  # no name cut short by an ellipsis

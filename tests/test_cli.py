"""The `localmoe` command: errors a user can act on, and offline generation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from localmoe import cli
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

"""Serving benchmark: LocalMoE's server and any OpenAI-compatible peer under the same streaming load.

    python benchmarks/serve_bench.py --model /tmp/bench-small \\
        --peer vllm-cpu http://127.0.0.1:8100 "vllm serve /tmp/bench-small --port 8100 ..." \\
        --peer llama.cpp http://127.0.0.1:8101 "llama-server -m bench.gguf --port 8101 ..."

Each system is started from its command (or, with "-" as the command, taken as already running),
measured at every concurrency in --concurrency, and stopped before the next one starts, so the
servers never compete for the cores. The load is that of `vllm bench serve --dataset-name random`:
prompts of --input-len random token ids (decoded to text, the same prompts for every system),
--output-len tokens each with EOS ignored, streamed from /v1/completions with usage, at most
--concurrency requests in flight. Per request it records the time to the first token (TTFT), the
time per output token after the first (TPOT) and the output token count the server reports.
With --vllm-bench PATH it also runs the official `vllm bench serve` once per system (at the
concurrency of --vllm-bench-concurrency) as a cross-check. Writes JSON (default
results/serve_bench.json); `benchmarks/plot_serve.py` draws it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Iterator

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer

from weights_floor import weights_floor

FIRST_TOKEN_ID = 3  # skip <unk>, <s>, </s>


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0  # seconds to the first streamed text
    latency: float = 0.0  # seconds to the end of the stream
    output_tokens: int = 0
    error: str = ""

    @property
    def tpot(self) -> float:
        return (self.latency - self.ttft) / (self.output_tokens - 1)


@dataclass
class LevelResult:
    concurrency: int
    num_prompts: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float
    output_throughput: float  # output tokens/s over the whole level
    mean_ttft_ms: float
    median_ttft_ms: float
    p99_ttft_ms: float
    mean_tpot_ms: float
    median_tpot_ms: float
    p99_tpot_ms: float
    errors: list[str] = field(default_factory=list)


def random_prompts(tokenizer, count: int, length: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(FIRST_TOKEN_ID, tokenizer.vocab_size, size=(count, length))
    return [tokenizer.decode(row.tolist()) for row in ids]


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, output_len: int) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, chunks, usage_tokens = 0.0, 0, None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                return RequestResult(False, error=f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line.endswith("[DONE]"):
                    continue
                data = json.loads(line[5:])
                if data.get("choices") and data["choices"][0].get("text"):
                    chunks += 1
                    if not ttft:
                        ttft = time.perf_counter() - start
                if data.get("usage"):
                    usage_tokens = data["usage"]["completion_tokens"]
    except httpx.HTTPError as error:
        return RequestResult(False, error=repr(error))
    return RequestResult(True, ttft, time.perf_counter() - start, usage_tokens or chunks)


async def run_level(url: str, model: str, prompts: list[str], output_len: int, concurrency: int) -> LevelResult:
    limit = asyncio.Semaphore(concurrency)
    timeout = httpx.Timeout(None)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def limited(prompt: str) -> RequestResult:
            async with limit:
                return await one_request(client, url, model, prompt, output_len)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(p) for p in prompts))
        duration = time.perf_counter() - start
    done = [r for r in results if r.ok]
    ttfts = [r.ttft * 1000 for r in done] or [float("nan")]
    tpots = [r.tpot * 1000 for r in done if r.output_tokens > 1] or [float("nan")]
    return LevelResult(
        concurrency=concurrency, num_prompts=len(prompts), completed=len(done), failed=len(results) - len(done),
        duration_s=duration, request_throughput=len(done) / duration,
        output_throughput=sum(r.output_tokens for r in done) / duration,
        mean_ttft_ms=statistics.mean(ttfts), median_ttft_ms=statistics.median(ttfts),
        p99_ttft_ms=float(np.percentile(ttfts, 99)),
        mean_tpot_ms=statistics.mean(tpots), median_tpot_ms=statistics.median(tpots),
        p99_tpot_ms=float(np.percentile(tpots, 99)),
        errors=sorted({r.error for r in results if not r.ok})[:5])


@contextmanager
def running(name: str, url: str, command: str | None, log_dir: Path, startup_timeout: float) -> Iterator[None]:
    """Start the server (unless command is None), wait until it answers, stop its whole process group after."""
    process = None
    if command is not None:
        log = open(log_dir / f"{name}.log", "w")
        process = subprocess.Popen(command, shell=True, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}; see {log_dir / f'{name}.log'}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not answer at {url} within {startup_timeout:.0f} s")
            time.sleep(1)
        yield
    finally:
        if process is not None:
            for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                try:
                    os.killpg(process.pid, sig)
                    process.wait(timeout=wait)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue


def served_model(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]


def vllm_bench(binary: str, url: str, model: str, tokenizer: str, args: argparse.Namespace, concurrency: int,
               out_dir: Path, name: str) -> dict:
    """The official `vllm bench serve` against the same server, as users will run it."""
    num_prompts = prompt_count(args, concurrency)
    command = [binary, "bench", "serve", "--backend", "openai", "--base-url", url, "--model", model,
               "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len", str(args.input_len),
               "--random-output-len", str(args.output_len), "--num-prompts", str(num_prompts),
               "--max-concurrency", str(concurrency), "--ignore-eos", "--save-result",
               "--result-dir", str(out_dir), "--result-filename", f"vllm-bench-{name}.json"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tempfile.gettempdir())
    (out_dir / f"vllm-bench-{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"error": f"vllm bench serve exited {done.returncode}", "command": shlex.join(command)}
    result = json.loads((out_dir / f"vllm-bench-{name}.json").read_text())
    keys = ("completed", "output_throughput", "request_throughput", "mean_ttft_ms", "p99_ttft_ms",
            "mean_tpot_ms", "p99_tpot_ms")
    return {"concurrency": concurrency, **{k: result.get(k) for k in keys}, "command": shlex.join(command)}


def prompt_count(args: argparse.Namespace, concurrency: int) -> int:
    return max(args.min_prompts, args.prompts_per_stream * concurrency)


def localmoe_command(model: str, port: int, extra: str) -> str:
    return shlex.join([sys.executable, "-m", "localmoe.cli", "serve", "--model", model, "--port", str(port),
                       "--dtype", "bfloat16"]) + (" " + extra if extra else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory (LocalMoE serves it; tokenizer for prompts)")
    parser.add_argument("--peer", nargs=3, action="append", default=[], metavar=("NAME", "URL", "COMMAND"),
                        help='another OpenAI-compatible server; COMMAND "-" means it is already running')
    parser.add_argument("--no-localmoe", action="store_true", help="measure only the peers")
    parser.add_argument("--localmoe-port", type=int, default=8199)
    parser.add_argument("--localmoe-args", default="", help="extra flags for `localmoe serve`")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--prompts-per-stream", type=int, default=4, help="prompts per level = this x concurrency")
    parser.add_argument("--min-prompts", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vllm-bench", default=None, help="path of a `vllm` executable for the cross-check")
    parser.add_argument("--vllm-bench-concurrency", type=int, default=16)
    parser.add_argument("--startup-timeout", type=float, default=900)
    parser.add_argument("--out", default="results/serve_bench.json")
    args = parser.parse_args()

    console = Console()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    systems: list[tuple[str, str, str | None]] = []
    if not args.no_localmoe:
        url = f"http://127.0.0.1:{args.localmoe_port}"
        systems.append(("localmoe", url, localmoe_command(args.model, args.localmoe_port, args.localmoe_args)))
    systems += [(name, url.rstrip("/"), None if cmd == "-" else cmd) for name, url, cmd in args.peer]
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="serve_bench-"))

    report: dict = {
        "load": {k: getattr(args, k) for k in ("input_len", "output_len", "concurrency", "prompts_per_stream",
                                               "min_prompts", "seed")},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "commands": {name: cmd for name, _, cmd in systems},
        "logs": str(log_dir),
        "systems": {},
        "vllm_bench": {},
    }
    for name, url, command in systems:
        console.print(f"[bold]{name}[/bold]: starting {command or url}")
        with running(name, url, command, log_dir, args.startup_timeout):
            model = served_model(url)
            warmup_seed = args.seed + len(args.concurrency)  # a seed no level uses
            asyncio.run(run_level(url, model, random_prompts(tokenizer, 2, args.input_len, seed=warmup_seed),
                                  args.output_len, 2))
            levels = {}
            for i, concurrency in enumerate(args.concurrency):
                prompts = random_prompts(tokenizer, prompt_count(args, concurrency), args.input_len,
                                         seed=args.seed + i)
                level = asyncio.run(run_level(url, model, prompts, args.output_len, concurrency))
                levels[str(concurrency)] = asdict(level)
                console.print(f"  c={concurrency}: {level.output_throughput:.1f} output tok/s, "
                              f"mean TTFT {level.mean_ttft_ms:.0f} ms, mean TPOT {level.mean_tpot_ms:.1f} ms, "
                              f"{level.completed}/{level.num_prompts} ok")
            report["systems"][name] = levels
            if args.vllm_bench:
                report["vllm_bench"][name] = vllm_bench(args.vllm_bench, url, model, args.model, args,
                                                        args.vllm_bench_concurrency, log_dir, name)
                console.print(f"  vllm bench serve: {report['vllm_bench'][name]}")
        out_path.write_text(json.dumps(report, indent=2))  # keep what is measured so far

    report["ratios"] = ratios(report["systems"])
    # what a one-stream TPOT is bound by: reading the step's weights, at this host's bandwidth now
    report["weights_floor"] = weights_floor(args.model)
    out_path.write_text(json.dumps(report, indent=2))
    print_table(console, report)
    floor = report["weights_floor"]
    console.print(f"floor: {floor['step_weight_bytes'] / 1e6:.0f} MB of weights a token at "
                  f"{floor['read_bandwidth_gb_s']:.1f} GB/s (two threads reading 1.5 GiB): "
                  f"{floor['floor_ms_per_token']:.2f} ms per token")
    console.print(f"wrote {out_path}")


def ratios(systems: dict[str, dict]) -> dict:
    """LocalMoE over each peer and over the best peer, per concurrency: throughput (higher is better)
    and mean TTFT (lower is better)."""
    ours = systems.get("localmoe")
    peers = {k: v for k, v in systems.items() if k != "localmoe"}
    if ours is None or not peers:
        return {}
    result: dict = {}
    for level, mine in ours.items():
        theirs = {name: levels[level] for name, levels in peers.items() if level in levels}
        if not theirs:
            continue
        best_tput = max(theirs.values(), key=lambda r: r["output_throughput"])
        best_ttft = min(theirs.values(), key=lambda r: r["mean_ttft_ms"])
        result[level] = {
            "output_throughput_over_best_peer": mine["output_throughput"] / best_tput["output_throughput"],
            "mean_ttft_over_best_peer": mine["mean_ttft_ms"] / best_ttft["mean_ttft_ms"],
            **{f"output_throughput_over_{name}": mine["output_throughput"] / r["output_throughput"]
               for name, r in theirs.items()},
            **{f"mean_ttft_over_{name}": mine["mean_ttft_ms"] / r["mean_ttft_ms"] for name, r in theirs.items()},
        }
    return result


def print_table(console: Console, report: dict) -> None:
    table = Table(title="output tokens/s | mean TTFT ms | mean TPOT ms")
    table.add_column("system")
    levels = [str(c) for c in report["load"]["concurrency"]]
    for level in levels:
        table.add_column(f"c={level}", justify="right")
    for name, results in report["systems"].items():
        table.add_row(name, *(f"{results[l]['output_throughput']:.0f} | {results[l]['mean_ttft_ms']:.0f} | "
                              f"{results[l]['mean_tpot_ms']:.1f}" if l in results else "-" for l in levels))
    console.print(table)
    for level, r in report.get("ratios", {}).items():
        console.print(f"c={level}: LocalMoE / best peer: throughput {r['output_throughput_over_best_peer']:.2f}x, "
                      f"mean TTFT {r['mean_ttft_over_best_peer']:.2f}x")


if __name__ == "__main__":
    main()

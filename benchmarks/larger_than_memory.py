"""Larger than memory: LocalMoE with its experts on disk against llama.cpp's mmap, inside the same memory limit.

    python benchmarks/make_checkpoint.py --out /tmp/bench-large --shape large
    PYTHONPATH=vendor/llama.cpp/gguf-py python vendor/llama.cpp/convert_hf_to_gguf.py /tmp/bench-large \\
        --outtype bf16 --outfile /tmp/bench-large.gguf
    python benchmarks/larger_than_memory.py --model /tmp/bench-large --gguf /tmp/bench-large.gguf \\
        --llama-server /path/to/llama-server --out results/larger_than_memory.json
    python benchmarks/plot_larger_than_memory.py results/larger_than_memory.json

Needs root: each server runs inside a memory cgroup this script creates and removes (v1 `memory.limit_in_bytes`
where the host has v1, v2 `memory.max` otherwise), limited to a fraction of the bf16 checkpoint's size (--fractions,
default 1/2 and 1/4); page cache counts against the limit. For every (fraction, concurrency) each system starts
fresh, after the page cache is dropped: llama-server with mmap on (its default) and as many slots as the
concurrency, `localmoe serve` with `--expert-offload-target disk --expert-cache-memory auto` and nothing else.
The load is the serving benchmark's: prompts of 128 random tokens, 128 output tokens with EOS ignored, streamed
from /v1/completions, all `concurrency` requests at once. Decode tokens/s is the sum over streams of (tokens - 1)
over the time from each stream's first token to its last; a stream still running at --deadline seconds is measured
up to then. For LocalMoE also the expert cache's hit rate and the distinct experts a step needed per layer (the
union over the batch). Greedy tokens from the limited LocalMoE are compared with the fully resident server's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_bench import localmoe_command, random_prompts, running, served_model  # noqa: E402

CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")


@dataclass
class Stream:
    times: list[float] = field(default_factory=list)  # when each text chunk (a token) arrived
    start: float = 0.0
    error: str = ""

    @property
    def decode_rate(self) -> float | None:
        if len(self.times) < 2:
            return None
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


@dataclass
class MemoryLimit:
    """A memory cgroup for one server, created and removed around it."""

    name: str
    limit: int

    @property
    def directory(self) -> Path:
        return (CGROUP_V1 if CGROUP_V1.is_dir() else CGROUP_V2) / self.name

    def __enter__(self) -> "MemoryLimit":
        self.directory.mkdir(exist_ok=True)
        limit_file = "memory.limit_in_bytes" if CGROUP_V1.is_dir() else "memory.max"
        (self.directory / limit_file).write_text(str(self.limit))
        return self

    def wrap(self, command: str) -> str:
        """A shell command that joins the cgroup, then becomes `command`."""
        return f"echo $$ > {self.directory / 'cgroup.procs'} && exec {command}"

    def peak(self) -> int | None:
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            if (self.directory / name).exists():
                return int((self.directory / name).read_text())
        return None

    def __exit__(self, *exc: object) -> None:
        for _ in range(50):  # the server's processes take a moment to leave after they are killed
            try:
                self.directory.rmdir()
                return
            except OSError:
                time.sleep(0.2)


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


async def stream_one(client: httpx.AsyncClient, url: str, model: str, prompt: str, output_len: int,
                     deadline: float, temperature: float = 0.0) -> tuple[Stream, str]:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": temperature, "stream": True,
            "ignore_eos": True}
    stream, text = Stream(start=time.perf_counter()), []
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                stream.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return stream, ""
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line.endswith("[DONE]"):
                    continue
                choices = json.loads(line[5:]).get("choices") or [{}]
                if choices[0].get("text"):
                    stream.times.append(time.perf_counter())
                    text.append(choices[0]["text"])
                if time.perf_counter() > deadline:
                    break
    except httpx.HTTPError as error:
        stream.error = repr(error)
    return stream, "".join(text)


async def load(url: str, model: str, prompts: list[str], output_len: int, deadline_s: float) -> list[Stream]:
    deadline = time.perf_counter() + deadline_s
    async with httpx.AsyncClient(timeout=httpx.Timeout(None)) as client:
        results = await asyncio.gather(*(stream_one(client, url, model, p, output_len, deadline) for p in prompts))
    return [stream for stream, _ in results]


async def greedy(url: str, model: str, prompts: list[str], output_len: int) -> list[str]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(None)) as client:
        results = [await stream_one(client, url, model, p, output_len, float("inf")) for p in prompts]
    return [text for _, text in results]


def expert_counters(url: str) -> dict[str, float]:
    layers = httpx.get(f"{url}/v1/stats/experts", timeout=30).json()["layers"]
    caches = [layer["cache"] for layer in layers if layer["cache"]]
    return {"hits": sum(sum(c["hits"]) for c in caches), "misses": sum(sum(c["misses"]) for c in caches),
            "steps": sum(c["steps"] for c in caches), "capacity": caches[0]["capacity"] if caches else None,
            "layers": len(caches)}


def summarize(streams: list[Stream], elapsed: float) -> dict:
    rates = [s.decode_rate for s in streams if s.decode_rate is not None]
    firsts = [s.times[0] - s.start for s in streams if s.times]
    return {"decode_tokens_per_s": sum(rates), "streams_measured": len(rates),
            "output_tokens": sum(len(s.times) for s in streams), "elapsed_s": elapsed,
            "mean_ttft_s": sum(firsts) / len(firsts) if firsts else None,
            "errors": sorted({s.error for s in streams if s.error})[:3]}


def run_level(system: str, command: str, url: str, limit: MemoryLimit, prompts: list[str], args: argparse.Namespace,
              log_dir: Path, reference: list[str] | None) -> dict:
    drop_page_cache()
    with limit, running(system, url, limit.wrap(command), log_dir, args.startup_timeout):
        model = served_model(url)
        result: dict = {"system": system, "command": command}
        if reference is not None:  # limited LocalMoE: first the greedy tokens of the resident run
            result["matches_resident"] = asyncio.run(greedy(url, model, args.reference_prompts, args.reference_len)) \
                == reference
        before = expert_counters(url) if system == "localmoe" else None
        start = time.perf_counter()
        streams = asyncio.run(load(url, model, prompts, args.output_len, args.deadline))
        result |= summarize(streams, time.perf_counter() - start)
        if before is not None:
            after = expert_counters(url)
            wanted = after["hits"] + after["misses"] - before["hits"] - before["misses"]
            result |= {"hit_rate": (after["hits"] - before["hits"]) / wanted if wanted else None,
                       "distinct_experts_per_layer_step": wanted / max(after["steps"] - before["steps"], 1),
                       "cache_experts_per_layer": after["capacity"]}
        result["cgroup_peak_bytes"] = limit.peak()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the bf16 checkpoint directory")
    parser.add_argument("--gguf", required=True, help="the same weights as a bf16 GGUF, for llama.cpp")
    parser.add_argument("--llama-server", required=True)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--deadline", type=float, default=240.0, help="seconds a level may run")
    parser.add_argument("--reference-len", type=int, default=16, help="greedy tokens compared with the resident run")
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument("--port", type=int, default=8311)
    parser.add_argument("--out", type=Path, default=Path("results/larger_than_memory.json"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root: it creates memory cgroups and drops the page cache")

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    url = f"http://127.0.0.1:{args.port}"
    checkpoint_bytes = sum(p.stat().st_size for p in Path(args.model).glob("*.safetensors"))
    args.reference_prompts = random_prompts(tokenizer, 2, args.input_len, seed=7)
    log_dir = Path(tempfile.mkdtemp(prefix="larger-than-memory-"))
    resident = localmoe_command(args.model, args.port, "")
    with running("localmoe-resident", url, resident, log_dir, args.startup_timeout):
        reference = asyncio.run(greedy(url, served_model(url), args.reference_prompts, args.reference_len))

    levels = []
    for fraction in args.fractions:
        limit = int(fraction * checkpoint_bytes)
        for concurrency in args.concurrency:
            prompts = random_prompts(tokenizer, concurrency, args.input_len, seed=concurrency)
            systems = {
                "llama.cpp": (shlex.join([args.llama_server, "-m", args.gguf, "-t", str(os.cpu_count()), "-np",
                                          str(concurrency), "-c", str(concurrency * 512), "--host", "127.0.0.1",
                                          "--port", str(args.port)]), None),
                "localmoe": (localmoe_command(args.model, args.port, "--expert-offload-target disk "
                                                                     "--expert-cache-memory auto"), reference),
            }
            for system, (command, expected) in systems.items():
                print(f"fraction {fraction}, concurrency {concurrency}: {system}", flush=True)
                try:
                    result = run_level(system, command, url, MemoryLimit(f"localmoe-bench-{os.getpid()}", limit),
                                       prompts, args, log_dir, expected)
                except RuntimeError as error:  # it did not start under this limit: its own words say why
                    log_tail = (log_dir / f"{system}.log").read_text().strip().splitlines()[-3:]
                    result = {"system": system, "command": command, "decode_tokens_per_s": None,
                              "error": f"{error}: {' | '.join(log_tail)}"}
                levels.append({"fraction": fraction, "limit_bytes": limit, "concurrency": concurrency, **result})
                print(json.dumps(levels[-1]), flush=True)

    ratios = []
    for fraction in args.fractions:
        for concurrency in args.concurrency:
            pair = {r["system"]: r for r in levels if r["fraction"] == fraction and r["concurrency"] == concurrency}
            ours, peer = pair["localmoe"]["decode_tokens_per_s"], pair["llama.cpp"]["decode_tokens_per_s"]
            ratios.append({"fraction": fraction, "concurrency": concurrency, "localmoe_tokens_per_s": ours,
                           "llama_cpp_tokens_per_s": peer, "ratio": ours / peer if ours and peer else None})
    report = {"model": args.model, "checkpoint_bytes": checkpoint_bytes, "machine": platform.node(),
              "cpus": os.cpu_count(), "input_len": args.input_len, "output_len": args.output_len,
              "deadline_s": args.deadline, "levels": levels, "ratios": ratios, "log_dir": str(log_dir)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for row in ratios:
        print(json.dumps(row))


if __name__ == "__main__":
    main()

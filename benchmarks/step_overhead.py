"""Where one stream's decode time goes, this tree against a baseline revision, side by side in one run.

    python benchmarks/step_overhead.py --model /tmp/bench-small --baseline HEAD~1 --out results/step_overhead.json

For each tree, in fresh processes, one after the other, --rounds times (the baseline is checked out into a git
worktree; each tree builds its own CPU kernels):
- offline: LocalMoE's Python API, one prompt of 128 tokens, greedy, EOS ignored; ms per token as
  (time for 160 new tokens - time for 32) / 128, so that the prompt and the first steps cancel out;
- the breakdown of that time, in a second pass with every kernel call timed: the kernels (reading weights),
  the rest of the forward pass (Python and PyTorch ops between the kernels, the attention metadata, the output
  head's gather), the rest of the engine's step (scheduling, sampling, detokenizing, outputs, statistics) and the
  rest of the loop around it;
- served: `localmoe serve` on the same checkpoint, three streamed completions of 256 tokens, one at a time; the
  time per output token after the first (TPOT), so the server's share is TPOT - offline.
Beside them, the floor: the step's weight bytes at this host's two-thread read bandwidth (weights_floor.py).
The report gives each tree's medians and the ratios baseline / this tree.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from serve_bench import localmoe_command, running
from weights_floor import weights_floor

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
PROMPT = list(range(100, 228))


def offline(model: str) -> dict[str, float]:
    """ms per token, and its breakdown, of one stream through the Python API of the tree on sys.path."""
    from localmoe import LLM, SamplingParams
    from localmoe.layers import cpu_kernels

    llm = LLM(model=model, dtype="bfloat16")
    engine = llm.engine

    def seconds(tokens: int) -> float:
        start = time.perf_counter()
        llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
        return time.perf_counter() - start

    seconds(8)  # warm
    per_token = statistics.median((seconds(160) - seconds(32)) / 128 * 1e3 for _ in range(3))

    spent: Counter[str] = Counter()
    built = cpu_kernels.kernels()

    def timed(label: str, work):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return work(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - start
        return run

    class TimedKernels:  # the extension, every call timed
        def __getattr__(self, name: str):
            spent["kernel calls"] += 1
            return timed("kernels", getattr(built, name))

    cpu_kernels.kernels = TimedKernels
    engine.runner._forward = timed("forward", engine.runner._forward)
    engine.step = timed("step", engine.step)
    seconds(32)
    spent.clear()
    total = seconds(160)
    steps = 160
    return {"ms_per_token": per_token,
            "kernels_ms": spent["kernels"] / steps * 1e3,
            "forward_outside_kernels_ms": (spent["forward"] - spent["kernels"]) / steps * 1e3,
            "step_outside_forward_ms": (spent["step"] - spent["forward"]) / steps * 1e3,
            "loop_outside_step_ms": (total - spent["step"]) / steps * 1e3,
            "kernel_calls_per_step": spent["kernel calls"] / steps}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(tree: Path, model: str, tokens: int = 256, requests: int = 3) -> float:
    """Median TPOT in ms of `requests` streamed completions, one at a time, from `localmoe serve` of `tree`."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = f"PYTHONPATH={shlex.quote(str(tree))} " + localmoe_command(model, port, "--disable-log-stats")
    with tempfile.TemporaryDirectory() as log_dir, running("localmoe", base, command, Path(log_dir), 600):
        name = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        body = {"model": name, "prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True, "temperature": 0,
                "stream": True}
        tpots = []
        for i in range(requests + 1):  # the first warms up
            arrivals = []
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        arrivals.append(time.perf_counter())
            if i:
                tpots.append((arrivals[-1] - arrivals[0]) / (len(arrivals) - 1) * 1e3)
        return statistics.median(tpots)


def run_tree(tree: Path, model: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{HERE.parent}"}
    done = subprocess.run([sys.executable, str(HERE), "--child", "--model", model], env=env, cwd=tree,
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["served_tpot_ms"] = served(tree, model)
    result["server_share_ms"] = result["served_tpot_ms"] - result["ms_per_token"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--baseline", default="HEAD~1", help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/step_overhead.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(offline(args.model)))
        return

    revision = subprocess.run(["git", "rev-parse", args.baseline], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    runs: dict[str, list[dict[str, float]]] = {"baseline": [], "this tree": []}
    with tempfile.TemporaryDirectory() as scratch:
        baseline = Path(scratch) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(baseline), revision], cwd=REPO, check=True,
                       capture_output=True)
        try:
            for round_ in range(args.rounds):
                for name, tree in (("baseline", baseline), ("this tree", REPO)):
                    runs[name].append(run_tree(tree, args.model))
                    print(f"round {round_ + 1} {name}: {runs[name][-1]}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=REPO, check=False)
    medians = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    report = {"model": args.model, "baseline": revision, "floor": weights_floor(args.model), "runs": runs,
              "medians": medians,
              "ratio_baseline_over_this_tree": {key: medians["baseline"][key] / medians["this tree"][key]
                                                for key in ("ms_per_token", "served_tpot_ms")}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("floor", "medians", "ratio_baseline_over_this_tree")}, indent=2))


if __name__ == "__main__":
    main()

"""One stream's decode time per token, this tree against a baseline revision, side by side in one run.

    python benchmarks/decode_step.py --model /tmp/bench-large --baseline HEAD~1 --out results/decode_step.json

The baseline is checked out into a git worktree; each round runs both trees, one after the other, in fresh
processes (each tree builds its own CPU kernels: their cache is keyed by the sources). A measurement is LocalMoE's
Python API on one prompt of 128 tokens, greedy, EOS ignored: (time for 96 new tokens - time for 32) / 64, so that
the prompt and the first steps cancel out; no HTTP, no client. The report gives each tree's median ms/token per
quantization and the speedup, baseline over this tree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent


def measure(model: str, quantizations: list[str]) -> dict[str, float]:
    """ms/token of each quantization ("none": the checkpoint's bf16), in this process's tree."""
    from localmoe import LLM, SamplingParams

    prompt = {"prompt_token_ids": list(range(100, 228))}

    def seconds(llm: LLM, tokens: int) -> float:
        start = time.perf_counter()
        llm.generate(prompt, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
        return time.perf_counter() - start

    result = {}
    for name in quantizations:
        llm = LLM(model=model, dtype="bfloat16", quantization=None if name == "none" else name)
        seconds(llm, 8)  # warm
        result[name] = (seconds(llm, 96) - seconds(llm, 32)) / 64 * 1000
        del llm
    return result


def run_tree(tree: Path, model: str, quantizations: list[str]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, str(HERE), "--child", "--model", model, "--quantization", *quantizations],
                          env=env, cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--baseline", default="HEAD~1", help="git revision to compare against")
    parser.add_argument("--quantization", nargs="+", default=["none", "int8", "int4"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/decode_step.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, args.quantization)))
        return

    revision = subprocess.run(["git", "rev-parse", args.baseline], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as scratch:
        baseline = Path(scratch) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(baseline), revision], cwd=REPO, check=True,
                       capture_output=True)
        try:
            runs: dict[str, list[dict[str, float]]] = {"baseline": [], "this tree": []}
            for round_ in range(args.rounds):
                for name, tree in (("baseline", baseline), ("this tree", REPO)):
                    runs[name].append(run_tree(tree, args.model, args.quantization))
                    print(f"round {round_ + 1} {name}: {runs[name][-1]}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=REPO, check=False)
    medians = {name: {q: statistics.median(r[q] for r in rs) for q in args.quantization} for name, rs in runs.items()}
    report = {"model": args.model, "baseline": revision, "runs": runs, "median_ms_per_token": medians,
              "speedup": {q: medians["baseline"][q] / medians["this tree"][q] for q in args.quantization}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("median_ms_per_token", "speedup")}, indent=2))


if __name__ == "__main__":
    main()

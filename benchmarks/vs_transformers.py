"""LocalMoE against transformers' `generate()` on the same checkpoint, in one run.

    python benchmarks/make_checkpoint.py --out /tmp/bench-small
    python benchmarks/vs_transformers.py --model /tmp/bench-small --repeats 3

Scenario A (single): one request of 128 random prompt tokens and 128 new tokens, greedy, EOS ignored;
reports the time to the first token (a separate 1-token run), the total wall time, and the decode rate
(127 tokens over total minus first-token time). Scenario B (batch): 32 such requests at once (LocalMoE: one
`llm.generate` call; transformers: one batched `generate` on equal-length prompts) -> output tokens/s.
Both systems are loaded and warmed up once, then timed in turn within each of --repeats rounds, so a burst
of other load on the machine hits both alike; figures are medians. Every round gets fresh random prompts
(no prefix cache hit), the same for both systems. Writes JSON (default results/vs_transformers.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.table import Table
from transformers import MixtralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
import localmoe  # noqa: E402
from localmoe import LLM, SamplingParams  # noqa: E402

# (prompts, new tokens) -> generated token ids, one list per prompt
Generate = Callable[[list[list[int]], int], list[list[int]]]
# scenario name ("first", "single", "batch") -> prompts
Prompts = dict[str, list[list[int]]]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FIRST_TOKEN_ID = 3  # skip <unk>, <s>, </s>
WARMUP_TOKENS = 8


def transformers_generate(model_dir: str, dtype: str) -> Generate:
    model = MixtralForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype]).eval()
    eos = model.config.eos_token_id

    def generate(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        input_ids = torch.tensor(prompts)
        with torch.inference_mode():
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=eos)
        return out[:, input_ids.shape[1]:].tolist()

    return generate


def localmoe_generate(model_dir: str, dtype: str) -> Generate:
    llm = LLM(model=model_dir, dtype=dtype, max_num_seqs=64, max_num_batched_tokens=4096)

    def generate(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params)
        return [out.outputs[0].token_ids for out in outs]

    return generate


SYSTEMS: dict[str, Callable[[str, str], Generate]] = {
    "transformers": transformers_generate,
    "localmoe": localmoe_generate,
}


def random_prompts(seed: int, count: int, length: int, vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_TOKEN_ID, vocab_size, (count, length), generator=generator).tolist()


def timed(generate: Generate, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    """Wall seconds of one call, and its outputs (checked to hold exactly `new_tokens` tokens each)."""
    start = time.perf_counter()
    outputs = generate(prompts, new_tokens)
    seconds = time.perf_counter() - start
    lengths = {len(ids) for ids in outputs}
    if len(outputs) != len(prompts) or lengths != {new_tokens}:
        raise RuntimeError(f"expected {len(prompts)} outputs of {new_tokens} tokens, got lengths {sorted(lengths)}")
    return seconds, outputs


def one_round(generate: Generate, prompts: Prompts, new_tokens: int) -> tuple[dict[str, float], list[int]]:
    """Times of scenario A (first token, whole request) and B, and scenario A's generated tokens."""
    first_s = timed(generate, prompts["first"], 1)[0]
    single_s, single_out = timed(generate, prompts["single"], new_tokens)
    batch_s = timed(generate, prompts["batch"], new_tokens)[0]
    return {"first_token_s": first_s, "single_total_s": single_s, "batch_total_s": batch_s}, single_out[0]


def summary(runs: dict[str, list[float]], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    first = statistics.median(runs["first_token_s"])
    total = statistics.median(runs["single_total_s"])
    batch = statistics.median(runs["batch_total_s"])
    return {
        "single": {"first_token_s": first, "total_s": total, "decode_tok_s": (args.new_tokens - 1) / (total - first)},
        "batch": {"total_s": batch, "output_tok_s": args.batch * args.new_tokens / batch},
    }


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def print_table(report: dict, args: argparse.Namespace) -> None:
    hf, moe = report["transformers"], report["localmoe"]
    ratio = report["ratio_localmoe_over_transformers"]
    table = Table(title=f"LocalMoE vs transformers {transformers.__version__}: {args.dtype}, "
                        f"{args.threads} threads, median of {args.repeats}")
    for column in ("figure", "transformers", "LocalMoE", "LocalMoE / transformers"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    rows = [
        ("A: first token (s)", "single", "first_token_s"),
        ("A: total wall (s)", "single", "total_s"),
        ("A: decode tok/s", "single", "decode_tok_s"),
        (f"B: output tok/s (x{args.batch})", "batch", "output_tok_s"),
    ]
    for name, scenario, key in rows:
        table.add_row(name, f"{hf[scenario][key]:.3f}", f"{moe[scenario][key]:.3f}",
                      f"{ratio[f'{scenario}_{key}']:.2f}")
    console = Console()
    console.print(table)
    console.print(f"greedy tokens shared with transformers before the first difference: "
                  f"{report['greedy_agreement_tokens']}")
    console.print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory (benchmarks/make_checkpoint.py)")
    parser.add_argument("--out", type=Path, default=Path("results/vs_transformers.json"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_average = {"start": os.getloadavg()}

    vocab_size = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    rounds: list[Prompts] = []
    for i in range(args.repeats + 1):  # round 0 is the warm-up
        seed = args.seed + 3 * i
        rounds.append({
            "first": random_prompts(seed, 1, args.prompt_tokens, vocab_size),
            "single": random_prompts(seed + 1, 1, args.prompt_tokens, vocab_size),
            "batch": random_prompts(seed + 2, args.batch, args.prompt_tokens, vocab_size),
        })

    generators: dict[str, Generate] = {}
    load_s: dict[str, float] = {}
    for name, make in SYSTEMS.items():
        start = time.perf_counter()
        generators[name] = make(args.model, args.dtype)
        load_s[name] = time.perf_counter() - start
        timed(generators[name], rounds[0]["single"], WARMUP_TOKENS)
        timed(generators[name], rounds[0]["batch"], WARMUP_TOKENS)

    runs: dict[str, dict[str, list[float]]] = {name: {} for name in SYSTEMS}
    single_outputs: dict[str, list[list[int]]] = {name: [] for name in SYSTEMS}
    for prompts in rounds[1:]:
        for name, generate in generators.items():
            times, tokens = one_round(generate, prompts, args.new_tokens)
            for key, seconds in times.items():
                runs[name].setdefault(key, []).append(seconds)
            single_outputs[name].append(tokens)
    load_average["end"] = os.getloadavg()

    hf, moe = summary(runs["transformers"], args), summary(runs["localmoe"], args)
    report = {
        "model": str(Path(args.model).resolve()),
        "dtype": args.dtype,
        "threads": args.threads,
        "repeats": args.repeats,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "localmoe": localmoe.__version__},
        "load_average": load_average,
        "transformers": {"load_s": load_s["transformers"], **hf, "runs": runs["transformers"]},
        "localmoe": {"load_s": load_s["localmoe"], **moe, "runs": runs["localmoe"]},
        "ratio_localmoe_over_transformers": {
            f"{scenario}_{key}": moe[scenario][key] / hf[scenario][key]
            for scenario in ("single", "batch") for key in hf[scenario]
        },
        "greedy_agreement_tokens": [
            common_prefix(a, b) for a, b in zip(single_outputs["localmoe"], single_outputs["transformers"])
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report, args)


if __name__ == "__main__":
    main()

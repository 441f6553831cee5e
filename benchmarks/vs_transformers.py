"""LocalMoE against transformers' `generate()` on the same checkpoint, in one run.

    python benchmarks/make_checkpoint.py --out /tmp/bench-small
    python benchmarks/vs_transformers.py --model /tmp/bench-small --repeats 3

Scenario A (single): one request of 128 random prompt tokens and 128 new tokens, greedy, EOS ignored;
reports the time to the first token (a separate 1-token run), the total wall time, and the decode rate
(127 tokens over total minus first-token time). Scenario B (batch): 32 such requests at once (LocalMoE: one
`llm.generate` call; transformers: one batched `generate` on equal-length prompts) -> output tokens/s.
Each figure is the median of --repeats runs after one warm-up per system; every run gets fresh random
prompts (so no prefix cache hit), the same for both systems. Writes JSON (default results/vs_transformers.json).
"""

from __future__ import annotations

import argparse
import gc
import json
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

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FIRST_TOKEN_ID = 3  # skip <unk>, <s>, </s>


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


def measure(generate: Generate, plan: list[dict[str, list[list[int]]]], args: argparse.Namespace) -> dict:
    """Warm up on plan[0], then time scenarios A and B on each later entry; medians plus raw runs."""
    warm = plan[0]
    timed(generate, warm["single"], 8)
    timed(generate, warm["batch"], 8)
    runs: dict[str, list[float]] = {"first_token_s": [], "single_total_s": [], "batch_total_s": []}
    single_outputs = []
    for prompts in plan[1:]:
        runs["first_token_s"].append(timed(generate, prompts["first"], 1)[0])
        seconds, outputs = timed(generate, prompts["single"], args.new_tokens)
        runs["single_total_s"].append(seconds)
        single_outputs.append(outputs[0])
        runs["batch_total_s"].append(timed(generate, prompts["batch"], args.new_tokens)[0])
    first = statistics.median(runs["first_token_s"])
    total = statistics.median(runs["single_total_s"])
    batch = statistics.median(runs["batch_total_s"])
    return {
        "single": {"first_token_s": first, "total_s": total,
                   "decode_tok_s": (args.new_tokens - 1) / (total - first)},
        "batch": {"total_s": batch, "output_tok_s": args.batch * args.new_tokens / batch},
        "runs": runs,
        "single_outputs": single_outputs,
    }


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run_system(make: Callable[[str, str], Generate], plan: list[dict[str, list[list[int]]]],
               args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    generate = make(args.model, args.dtype)
    load_s = time.perf_counter() - start
    result = measure(generate, plan, args)
    del generate
    gc.collect()
    return {"load_s": load_s, **result}


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

    vocab_size = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    plan = []
    for i in range(args.repeats + 1):  # entry 0 is the warm-up
        seed = args.seed + 3 * i
        plan.append({
            "first": random_prompts(seed, 1, args.prompt_tokens, vocab_size),
            "single": random_prompts(seed + 1, 1, args.prompt_tokens, vocab_size),
            "batch": random_prompts(seed + 2, args.batch, args.prompt_tokens, vocab_size),
        })

    hf = run_system(transformers_generate, plan, args)
    moe = run_system(localmoe_generate, plan, args)
    agreement = [common_prefix(a, b) for a, b in zip(moe.pop("single_outputs"), hf.pop("single_outputs"))]

    report = {
        "model": str(Path(args.model).resolve()),
        "dtype": args.dtype,
        "threads": args.threads,
        "repeats": args.repeats,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__,
                     "localmoe": getattr(localmoe, "__version__", "unknown")},
        "transformers": hf,
        "localmoe": moe,
        "ratio_localmoe_over_transformers": {
            "single_decode_tok_s": moe["single"]["decode_tok_s"] / hf["single"]["decode_tok_s"],
            "single_total_s": moe["single"]["total_s"] / hf["single"]["total_s"],
            "single_first_token_s": moe["single"]["first_token_s"] / hf["single"]["first_token_s"],
            "batch_output_tok_s": moe["batch"]["output_tok_s"] / hf["batch"]["output_tok_s"],
        },
        "greedy_agreement_tokens": agreement,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    ratio = report["ratio_localmoe_over_transformers"]
    table = Table(title=f"LocalMoE vs transformers {transformers.__version__} "
                        f"({args.dtype}, {args.threads} threads, median of {args.repeats})")
    for column in ("figure", "transformers", "LocalMoE", "ratio"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    rows = [
        ("A: first token (s)", hf["single"]["first_token_s"], moe["single"]["first_token_s"],
         ratio["single_first_token_s"]),
        ("A: total wall (s)", hf["single"]["total_s"], moe["single"]["total_s"], ratio["single_total_s"]),
        ("A: decode tok/s", hf["single"]["decode_tok_s"], moe["single"]["decode_tok_s"],
         ratio["single_decode_tok_s"]),
        (f"B: output tok/s (x{args.batch})", hf["batch"]["output_tok_s"], moe["batch"]["output_tok_s"],
         ratio["batch_output_tok_s"]),
    ]
    for name, a, b, r in rows:
        table.add_row(name, f"{a:.3f}", f"{b:.3f}", f"{r:.2f}x")
    console = Console()
    console.print(table)
    console.print(f"greedy tokens shared with transformers before the first difference: {agreement}")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

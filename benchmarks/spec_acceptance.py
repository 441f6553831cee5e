"""Speculative decoding on the built-in model: acceptance and engine steps per method, the workload n-gram lookup
exists for (a held-out passage given twice, then its start: the model is asked to go on quoting it).

    python benchmarks/spec_acceptance.py --out results/spec_acceptance.json

Counts first (steps and tokens do not depend on how busy the machine is): for each configuration and
temperature, the engine steps the prompts take as one batch, the drafted and accepted tokens, acceptance per draft
position, and the tokens a verifying step gives a sequence on average; at temperature 0, whether the output is the
one decoding without speculation gives. Then one stream's speed: the same prompts one at a time, output tokens per
second, and its ratio to no speculation in the same run (--dtype bfloat16 for the default serving setting).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from localmoe import LLM, SamplingParams
from localmoe.models.builtin import SHIPPED_DIR

def configs(model: Path) -> dict[str, dict | None]:
    ngram = {"method": "ngram"}
    return {"none": None,
            "ngram k=4 n=1..4": ngram | {"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1},
            "ngram k=2 n=2..3": ngram | {"num_speculative_tokens": 2, "prompt_lookup_max": 3, "prompt_lookup_min": 2},
            "draft_model=itself k=3": {"model": str(model), "num_speculative_tokens": 3}}


def passages(model: Path, count: int, chars: int) -> list[str]:
    """Passages of the held-out sample, twice as long as quoted, so each has its true continuation."""
    text = (model / "heldout_sample.txt").read_text()
    return [text[i:i + 2 * chars] for i in range(0, 2 * chars * count, 2 * chars)]


def prompt(passage: str, chars: int) -> str:
    quoted = passage[:chars]
    return f"{quoted}\n\n{quoted}\n\n{quoted[:60]}"


def quoted_chars(passage: str, output: str) -> int:
    """How far the output follows the passage from where the prompt stopped quoting it."""
    expected = passage[60:]
    return next((i for i, (a, b) in enumerate(zip(expected, output)) if a != b), min(len(expected), len(output)))


def run(model: Path, config: dict | None, texts: list[str], temperature: float, max_tokens: int, dtype: str) -> dict:
    llm = LLM(model=str(model), dtype=dtype, kv_cache_memory=256 * 2**20, speculative_config=config)
    engine, steps = llm.engine, [0]
    step = engine.step

    def counted():
        steps[0] += 1
        return step()

    engine.step = counted
    outputs = llm.generate(texts, SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True,
                                                 seed=1))
    stats = engine.stats.spec_decode
    result = {"steps": steps[0], "token_ids": [o.outputs[0].token_ids for o in outputs],
              "texts": [o.outputs[0].text for o in outputs]}
    one = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True, seed=1)
    llm.generate(texts[0], SamplingParams(max_tokens=8))  # warm
    start, tokens = time.perf_counter(), 0
    for text in texts:
        tokens += len(llm.generate(text, one)[0].outputs[0].token_ids)
    result["one_stream_tokens_per_s"] = tokens / (time.perf_counter() - start)
    if stats is not None:
        result |= {"draft_tokens": stats.num_draft_tokens, "accepted_tokens": stats.num_accepted_tokens,
                   "acceptance_rate": stats.acceptance_rate,
                   "accepted_per_position": list(stats.num_accepted_tokens_per_pos),
                   "tokens_per_verifying_step": 1 + stats.num_accepted_tokens / max(stats.num_drafts, 1)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SHIPPED_DIR, help="a checkpoint with a heldout_sample.txt")
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--chars", type=int, default=600, help="characters of each passage")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=Path("results/spec_acceptance.json"))
    args = parser.parse_args()
    sources = passages(args.model, args.prompts, args.chars)
    texts = [prompt(p, args.chars) for p in sources]
    rows = []
    for temperature in (0.0, 1.0):
        plain = None
        for name, config in configs(args.model).items():
            result = run(args.model, config, texts, temperature, args.max_tokens, args.dtype)
            plain = plain or result
            if name == "none" and temperature == 0:
                quoted = [quoted_chars(p, t) for p, t in zip(sources, result["texts"])]
                print(json.dumps({"greedy_quoted_chars": quoted, "output_chars": [len(t) for t in result["texts"]]}))
            same = result["token_ids"] == plain["token_ids"] if temperature == 0 else None
            speedup = result["one_stream_tokens_per_s"] / plain["one_stream_tokens_per_s"]
            rows.append({"config": name, "temperature": temperature, "same_as_plain": same,
                         "one_stream_speedup_over_none": speedup,
                         **{k: v for k, v in result.items() if k not in ("token_ids", "texts")}})
            print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": str(args.model), "dtype": args.dtype, "max_tokens": args.max_tokens,
                                    "greedy_quoted_chars": quoted, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

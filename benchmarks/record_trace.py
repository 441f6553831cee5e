"""Record a routing trace of the built-in model on its held-out sample, for the offloading work.

    python benchmarks/record_trace.py --out benchmarks/traces/localmoe-builtin-heldout.jsonl

Each held-out window is served as a prompt (one generated token) with `routing_trace` on, so the
trace holds, for every prompt token and MoE layer, the experts the trained router chose.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from localmoe import LLM, SamplingParams  # noqa: E402
from localmoe.experts.trace import read_trace  # noqa: E402
from localmoe.models.builtin import SHIPPED_DIR  # noqa: E402
from localmoe.train.corpus import read_documents  # noqa: E402
from localmoe.train.evaluate import SAMPLE_FILE, token_windows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SHIPPED_DIR)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.unlink(missing_ok=True)
    llm = LLM(model=str(args.model), dtype="float32", routing_trace=str(args.out))
    windows = token_windows(llm.get_tokenizer(), read_documents(args.model / SAMPLE_FILE))
    llm.generate([{"prompt_token_ids": w} for w in windows], SamplingParams(max_tokens=1, temperature=0))
    llm.engine.trace.close()
    tokens = sum(len(r["tokens"]) for r in read_trace(args.out))
    print(f"{tokens} tokens x {len(llm.engine.model.layers)} layers written to {args.out}")


if __name__ == "__main__":
    main()

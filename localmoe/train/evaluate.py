"""Held-out perplexity of a checkpoint, computed by LocalMoE's own engine (prompt logprobs).

The built-in checkpoint ships with a held-out sample (the opening of every held-out document), so
its figure can be reproduced anywhere:

    python -m localmoe.train.evaluate            # the built-in model on its shipped sample
    python -m localmoe.train.evaluate --model DIR --corpus corpus   # any checkpoint, whole held-out split
    python -m localmoe.train.evaluate --dtype bfloat16 --quantization int4   # what quantization costs
    python -m localmoe.train.evaluate --dtype bfloat16 --kv-cache-dtype fp8  # what an fp8 KV cache costs
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from localmoe.llm import LLM
from localmoe.sampling_params import SamplingParams
from localmoe.train.corpus import join_texts, read_documents

SAMPLE_FILE = "heldout_sample.txt"
SAMPLE_CHARS = 4000  # from the start of each held-out document
WINDOW = 256


def write_heldout_sample(corpus_dir: Path, out_dir: Path) -> None:
    texts = [doc[:SAMPLE_CHARS] for doc in read_documents(corpus_dir / "heldout.txt")]
    (out_dir / SAMPLE_FILE).write_text(join_texts(texts), encoding="utf-8")


def token_windows(tokenizer, texts: list[str], window: int = WINDOW) -> list[list[int]]:
    """Each text tokenized and cut into consecutive windows of at most `window` tokens."""
    windows = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        windows += [ids[i:i + window] for i in range(0, len(ids), window) if len(ids[i:i + window]) > 1]
    return windows


def perplexity(llm: LLM, windows: list[list[int]]) -> float:
    """exp of the mean negative log-likelihood of every token given the ones before it in its window."""
    outputs = llm.generate([{"prompt_token_ids": w} for w in windows], SamplingParams(max_tokens=1, prompt_logprobs=0))
    nll, count = 0.0, 0
    for window, out in zip(windows, outputs):
        for target, entry in zip(window[1:], out.prompt_logprobs[1:]):
            nll -= entry[target].logprob
            count += 1
    return math.exp(nll / count)


def main(argv: list[str] | None = None) -> None:
    from localmoe.models.builtin import SHIPPED_DIR

    parser = argparse.ArgumentParser(description="Held-out perplexity computed by LocalMoE.")
    parser.add_argument("--model", type=Path, default=SHIPPED_DIR)
    parser.add_argument("--corpus", type=Path, help="use the whole heldout.txt of this corpus")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantization", help="int8, int4, experts_int8 or fp8 (quant/scheme.py)")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's dtype) or fp8")
    args = parser.parse_args(argv)
    texts = read_documents(args.corpus / "heldout.txt" if args.corpus else args.model / SAMPLE_FILE)
    llm = LLM(model=str(args.model), dtype=args.dtype, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype)
    windows = token_windows(llm.get_tokenizer(), texts)
    print(f"held-out perplexity {perplexity(llm, windows):.2f} "
          f"({sum(len(w) - 1 for w in windows)} predicted tokens in {len(windows)} windows of <= {WINDOW})")


if __name__ == "__main__":
    main()

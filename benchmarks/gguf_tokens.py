"""Greedy tokens of LocalMoE and llama.cpp on the same GGUF file (Q4_K_M by default: Q4_K and Q6_K blocks, which
LocalMoE serves packed, llama.cpp's own kernels on the other side).

    python benchmarks/gguf_tokens.py --gguf /tmp/bench-large-Q4_K_M.gguf --tokenizer /tmp/bench-large \\
        --llama-server /path/to/llama-server --out results/gguf_tokens.json

Both get the same prompts as token ids (BOS first) and decode greedily with EOS ignored; LocalMoE through its
Python API (bf16 on the CPU kernels, and float32 on the dequantize-then-matmul path), llama.cpp through
llama-server's /completion with return_tokens. Two different computations of the same weights agree token for
token until a near tie between the top two logits falls the other way, after which they follow different texts;
the report gives, per prompt, how many leading tokens agree, and as the noise floor how far LocalMoE's bf16 and
float32 runs agree with each other.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import httpx
import numpy as np
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_bench import running  # noqa: E402

from localmoe import LLM, SamplingParams  # noqa: E402


def prompts_of(tokenizer, count: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, tokenizer.vocab_size, size=(count, length))
    return [[tokenizer.bos_token_id, *row.tolist()] for row in ids]


def llama_cpp_tokens(url: str, prompt: list[int], max_tokens: int) -> list[int]:
    body = {"prompt": prompt, "n_predict": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "return_tokens": True, "cache_prompt": False}
    return httpx.post(f"{url}/completion", json=body, timeout=600).json()["tokens"]


def localmoe_tokens(gguf: Path, tokenizer: Path, dtype: str, prompts: list[list[int]],
                    max_tokens: int) -> list[list[int]]:
    llm = LLM(model=str(gguf), tokenizer=str(tokenizer), dtype=dtype)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [list(o.outputs[0].token_ids) for o in outputs]


def agreed(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True, help="the original checkpoint directory")
    parser.add_argument("--llama-server", required=True)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=8231)
    parser.add_argument("--out", type=Path, default=Path("results/gguf_tokens.json"))
    args = parser.parse_args()

    prompts = prompts_of(AutoTokenizer.from_pretrained(args.tokenizer), args.prompts, args.prompt_len, seed=0)
    url = f"http://127.0.0.1:{args.port}"
    command = f"{args.llama_server} -m {args.gguf} -t 2 -c 2048 --host 127.0.0.1 --port {args.port}"
    with running("llama.cpp", url, command, args.out.parent, startup_timeout=300):
        theirs = [llama_cpp_tokens(url, p, args.max_tokens) for p in prompts]
    report = {"gguf": str(args.gguf), "prompts": len(prompts), "prompt_len": args.prompt_len,
              "max_tokens": args.max_tokens, "llama.cpp": theirs, "agreement": {}}
    for dtype in ("bfloat16", "float32"):
        ours = localmoe_tokens(args.gguf, args.tokenizer, dtype, prompts, args.max_tokens)
        leading = [agreed(a, b) for a, b in zip(ours, theirs)]
        report[f"localmoe-{dtype}"] = ours
        report["agreement"][dtype] = {"leading_tokens_agreed": leading, "median": statistics.median(leading),
                                      "all_agreed": sum(n == args.max_tokens for n in leading)}
        print(dtype, report["agreement"][dtype], flush=True)
    # how far LocalMoE's own two computations of the same weights agree: the noise floor of the comparison
    leading = [agreed(a, b) for a, b in zip(report["localmoe-bfloat16"], report["localmoe-float32"])]
    report["agreement"]["localmoe bfloat16 vs float32"] = {"leading_tokens_agreed": leading,
                                                          "median": statistics.median(leading)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

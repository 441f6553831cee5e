"""Decode speed against the memory roofline: one stream's tokens/s, the fraction of the device's copy bandwidth its
weight reads reach, CUDA graphs on and off, and throughput at 16 and 64 concurrent requests.

    python benchmarks/make_checkpoint.py --out /tmp/bench-large --shape large
    python benchmarks/gpu_roofline.py --model /tmp/bench-large --out results/gpu_roofline.json

Roofline: a decode step of one stream reads every weight it uses once (attention, norms and output head of every
layer, the K routed experts of each MoE layer, one embedding row), so its best time is those bytes over the
memory bandwidth. The bandwidth is a device-to-device copy measured in the same run, counting bytes read plus
written. fraction = (weight bytes per token / measured step time) / copy bandwidth. KV reads are left out: at
the short contexts measured here they are a few percent of the weights.

Each configuration runs in its own process (a fresh device, its own KV pool):
- graphs: the Triton kernels, decode steps replayed as CUDA graphs (the default on CUDA);
- eager: the Triton kernels, --enforce-eager;
- reference: the PyTorch paths (LOCALMOE_REFERENCE_KERNELS=1), eager.
On CPU (--device cpu, a smoke run of the script) only "eager" runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from localmoe import LLM, SamplingParams  # noqa: E402

CONFIGS = {"graphs": {}, "eager": {"enforce_eager": True}, "reference": {"enforce_eager": True}}


def copy_bandwidth(device: torch.device, megabytes: int, rounds: int = 10) -> float:
    """Bytes read plus written per second by a device-to-device copy of `megabytes` MiB (the best of `rounds`)."""
    src = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(rounds):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            began = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - began
        best = min(best, seconds)
    return 2 * src.numel() / best


def weight_bytes_per_token(config: dict, itemsize: int) -> int:
    """Bytes of weights one decode step of one stream reads, from a Mixtral-shaped config.json: per layer the
    attention projections, the router, the K routed experts and two norms; the final norm, the output head and one
    embedding row (the whole embedding where the head shares it)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    experts = config["num_experts_per_tok"] * 3 * hidden * inter
    layer = attention + hidden * config["num_local_experts"] + experts + 2 * hidden
    head = config["vocab_size"] * hidden
    embedding = 0 if config.get("tie_word_embeddings") else hidden
    return (config["num_hidden_layers"] * layer + hidden + head + embedding) * itemsize


def prompts(count: int, length: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(3, vocab, (length,), generator=g).tolist()} for _ in range(count)]


def decode_speed(llm: LLM, prompt: dict, new_tokens: int) -> float:
    """One greedy stream: tokens/s after the first token."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    times = llm.generate(prompt, params)[0].metrics
    return (new_tokens - 1) / (times["finished_time"] - times["first_token_time"])


def throughput(llm: LLM, batch: list[dict], new_tokens: int) -> float:
    """Output tokens/s of a batch of requests submitted at once."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    began = time.perf_counter()
    outs = llm.generate(batch, params)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - began)


def measure(args: argparse.Namespace, name: str) -> dict:
    """One configuration in this process."""
    if name == "reference":
        os.environ["LOCALMOE_REFERENCE_KERNELS"] = "1"
    device = torch.device(args.device)
    memory = {"kv_cache_memory": args.kv_cache_memory} if args.kv_cache_memory else {}
    llm = LLM(model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
              max_num_seqs=max(args.concurrency), enable_prefix_caching=False, **memory, **CONFIGS[name])
    engine = llm.engine
    config = engine.hf_config
    vocab = config["vocab_size"]
    stream = prompts(1, args.prompt_len, vocab, seed=0)[0]
    decode_speed(llm, stream, 8)  # warm-up: kernels compile, the allocator settles
    speeds = [decode_speed(llm, stream, args.new_tokens) for _ in range(args.rounds)]
    speed = max(speeds)
    per_token = weight_bytes_per_token(config, engine.runner.dtype.itemsize)
    bandwidth = copy_bandwidth(device, args.copy_megabytes)
    result = {
        "config": name, "decode_tokens_per_s": speed, "decode_tokens_per_s_rounds": speeds,
        "step_ms": 1e3 / speed, "weight_bytes_per_token": per_token,
        "copy_bandwidth_bytes_per_s": bandwidth, "roofline_tokens_per_s": bandwidth / per_token,
        "roofline_fraction": speed * per_token / bandwidth,
        "cuda_graphs": getattr(engine.runner, "graphs", None) is not None,
        "concurrency": {},
    }
    for count in args.concurrency:
        batch = prompts(count, args.prompt_len, vocab, seed=count)
        result["concurrency"][str(count)] = {"output_tokens_per_s": throughput(llm, batch, args.new_tokens)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, default=Path("results/gpu_roofline.json"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--configs", nargs="+", default=None, choices=sorted(CONFIGS),
                        help="default: all on CUDA, eager on CPU")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--kv-cache-memory", default=None, help="default: gpu_memory_utilization on CUDA")
    parser.add_argument("--copy-megabytes", type=int, default=1024)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args, args.child)))
        return
    configs = args.configs or (sorted(CONFIGS) if args.device.startswith("cuda") else ["eager"])
    results = []
    for name in configs:
        began = time.perf_counter()
        run = subprocess.run([sys.executable, *sys.argv, "--child", name], capture_output=True, text=True)
        if run.returncode == 0:
            result = json.loads(run.stdout.strip().splitlines()[-1])
        else:  # one configuration failing leaves the others' figures
            result = {"config": name, "error": run.stderr[-4000:]}
        result["seconds"] = time.perf_counter() - began
        print(json.dumps(result), flush=True)
        results.append(result)
    report = {
        "benchmark": "gpu_roofline", "model": args.model, "dtype": args.dtype, "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "results": results,
        "host": {"torch": torch.__version__}, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Tensor and expert parallelism against one process on the same total cores, and the planner's projection for
large models on H100s.

    python benchmarks/parallel_speed.py --out results/parallel_speed.json
    python benchmarks/parallel_speed.py --model /tmp/bench-small --cores 8 --out results/parallel_speed.json

Measured (CPU, gloo, the built-in model unless --model, bfloat16, prefix caching off): for one process with C
threads, TP=2 and EP=2 (TP=2 with --enable-expert-parallel) with C/2 threads in each of the two ranks, greedy
decoding of N streams at once: output tokens/s over the whole run, and the bytes the collectives moved per token
as rank 0 counted them (distributed/collectives.py) next to the planner's prediction for the same layout
(planner/parallel.py): all-reduce bytes per computed token, gathered logits bytes per sampled token.

Projected (no measurement): `localmoe plan`'s layout of Mixtral-8x7B at TP=2 and DeepSeek-V3 at EP=32 (TP=32 for
attention) in bf16 on H100-80GB: memory per rank, all-reduce bytes per token, and the time a decode step of B
tokens spends in all-reduces, ring algorithm, at the link bandwidths stated in the JSON (NVLink 4: 450 GB/s each
way per GPU; EP=32 spans four 8-GPU nodes, so also InfiniBand NDR: 50 GB/s per GPU) plus a fixed latency per
all-reduce.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from localmoe import LLM, SamplingParams  # noqa: E402
from localmoe.distributed.layout import layout_plan  # noqa: E402
from localmoe.planner import load_config, model_shape, parse_device, plan_memory  # noqa: E402

BUILTIN = Path(__file__).resolve().parent.parent / "localmoe" / "data" / "localmoe-builtin"
LAYOUTS = {"single": {}, "tp2": {"tensor_parallel_size": 2},
           "ep2": {"tensor_parallel_size": 2, "enable_expert_parallel": True}}
# what the projection assumes: NVLink 4 on H100 SXM is 900 GB/s per GPU, both directions together; NDR
# InfiniBand is one 400 Gb/s port per GPU; NCCL's small-message all-reduce latency is of the order of 10 us
BANDWIDTH_BYTES_PER_S = {"nvlink4_h100": 450e9, "infiniband_ndr_400g": 50e9}
ALL_REDUCE_LATENCY_S = 10e-6
PROJECTIONS = [("Mixtral-8x7B", 2, False), ("DeepSeek-V3", 32, True)]
DECODE_BATCHES = [1, 64, 256]


def prompts(count: int, length: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"prompt_token_ids": torch.randint(3, 1000, (length,), generator=g).tolist()} for _ in range(count)]


def measure(model: str, layout: str, cores: int, streams: int, new_tokens: int, prompt_len: int) -> dict:
    """One layout's run: `cores` threads in all, split evenly over its ranks."""
    ranks = LAYOUTS[layout].get("tensor_parallel_size", 1)
    threads = max(1, cores // ranks)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the workers' (spawned: they read it as they start)
    torch.set_num_threads(threads)
    llm = LLM(model=model, dtype="bfloat16", kv_cache_memory=256 * 2**20, max_model_len=1024,
              enable_prefix_caching=False, **LAYOUTS[layout])
    try:
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        llm.generate(prompts(1, prompt_len), SamplingParams(max_tokens=4, temperature=0))  # warm-up
        start = time.perf_counter()
        outs = llm.generate(prompts(streams, prompt_len), params)
        seconds = time.perf_counter() - start
        engine = llm.engine
        result = {"layout": layout, "ranks": ranks, "threads_per_rank": threads, "streams": streams,
                  "prompt_tokens": prompt_len, "new_tokens": new_tokens, "seconds": seconds,
                  "output_tokens_per_s": sum(len(o.outputs[0].token_ids) for o in outs) / seconds,
                  "tokens": [o.outputs[0].token_ids for o in outs]}
        parallel = engine.runner.parallel_stats()
        if parallel is not None:
            counted = parallel["collective_bytes"]
            plan = layout_plan(engine.config, engine.hf_config, engine.device, 2**40, 1024)
            result.update(
                measured_all_reduce_bytes_per_token=counted["all_reduce_bytes_per_token"],
                planned_all_reduce_bytes_per_token=plan.all_reduce_bytes_per_token,
                measured_gather_bytes_per_sampled_token=counted["gather_bytes_per_sampled_row"],
                planned_gather_bytes_per_sampled_token=plan.gather_bytes_per_sampled_token,
                measured_bytes_per_token=counted["bytes_per_token"],
                rank_weight_bytes=engine.runner.rank_weight_bytes(),
                rank_expert_bytes=engine.runner.on_every_rank("expert_bytes"))
        return result
    finally:
        llm.engine.runner.shutdown()


def projection(name: str, ranks: int, expert_parallel: bool) -> dict:
    """The planner's layout of a known model on H100s, and the all-reduce time per decode step it implies."""
    shape_name, config = load_config(name)
    plan = plan_memory(model_shape(shape_name, config), parse_device("H100-80GB"), tensor_parallel_size=ranks,
                       expert_parallel=expert_parallel)
    layout = plan.layout
    per_step = {}
    for link, bandwidth in BANDWIDTH_BYTES_PER_S.items():
        per_step[link] = {f"batch_{b}": layout.all_reduces_per_token * ALL_REDUCE_LATENCY_S
                          + b * layout.link_bytes_per_token / bandwidth for b in DECODE_BATCHES}
    return {"model": name, "device": plan.device, "dtype": plan.dtype, "tensor_parallel_size": ranks,
            "expert_parallel": expert_parallel, "layout": asdict(layout),
            "all_reduce_seconds_per_decode_step": per_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(BUILTIN))
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = [measure(args.model, layout, args.cores, args.streams, args.new_tokens, args.prompt_len)
            for layout in args.layouts]
    same = {run["layout"]: run.pop("tokens") == runs[0]["tokens"] for run in runs[1:]}
    runs[0].pop("tokens")
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": args.cores,
                          "torch": torch.__version__},
              "model": args.model, "dtype": "bfloat16", "runs": runs, "tokens_equal_single_process": same,
              "projection_assumptions": {"link_bytes_per_s": BANDWIDTH_BYTES_PER_S,
                                         "all_reduce_latency_s": ALL_REDUCE_LATENCY_S,
                                         "algorithm": "ring: 2(N-1)/N of the payload over each GPU's link"},
              "projections": [projection(*p) for p in PROJECTIONS]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for run in runs:
        extra = (f", {run['measured_bytes_per_token']:.0f} collective bytes/token (planned all-reduce "
                 f"{run['planned_all_reduce_bytes_per_token']}/token)" if run["ranks"] > 1 else "")
        print(f"{run['layout']}: {run['output_tokens_per_s']:.1f} tokens/s{extra}")
    print(f"tokens equal to one process: {same}; wrote {args.out}")


if __name__ == "__main__":
    main()

"""Expert offloading sweep: decode speed, cache hit rate and bytes moved against the expert cache's budget.

    python benchmarks/make_checkpoint.py --out /tmp/bench-large --shape large
    python benchmarks/offload_sweep.py --model /tmp/bench-large --out results/offload_sweep.json
    python benchmarks/plot_offload.py results/offload_sweep.json

Served measurements (the checkpoint's random weights): one stream decoding greedily in bfloat16, for every
cache size (all experts resident; 1/2, 1/4, 1/8 of them) x policy (lru, lfu, lfru) x prefetch off/on, with
the experts offloaded to host memory and to disk. A `disk` run reads the safetensors file by offset; with this
much RAM the file sits in the page cache ("warm"), so each `disk` setting also runs "cold": the file's cached
pages are dropped (posix_fadvise DONTNEED) before the run, so its first read of every expert comes from the disk.
The fully resident engine runs before and after the sweep and every result carries its ratio to their median.

Random routers spread tokens unrealistically evenly, so a second table replays a routing trace recorded from
the trained built-in model (benchmarks/traces/, 4 MoE layers x 8 experts, top-2) through the same ExpertCache
token by token: hit rates for each size and policy, bytes as if each expert were one of the large checkpoint's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from localmoe import LLM, SamplingParams  # noqa: E402
from localmoe.experts.cache import POLICIES, ExpertCache  # noqa: E402
from localmoe.experts.observer import RoutingObserver  # noqa: E402
from localmoe.experts.offload import OffloadPlan, attach_caches  # noqa: E402
from localmoe.experts.stats import expert_stats  # noqa: E402
from localmoe.experts.store import ExpertStore  # noqa: E402
from localmoe.experts.trace import read_trace  # noqa: E402
from localmoe.layers.moe import moe_blocks  # noqa: E402

TRACE = Path(__file__).resolve().parent / "traces" / "localmoe-builtin-heldout.jsonl"
PROMPT = ("The expert cache keeps the experts a model uses most on the device and reads the others from host "
          "memory or from disk when a token routes to them, so a model larger than memory still serves.")


def decode_run(llm: LLM, new_tokens: int) -> tuple[float, list[int]]:
    """One greedy stream: decode tokens/s after the first token, and the tokens."""
    out = llm.generate(PROMPT, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))[0]
    times = out.metrics
    return (new_tokens - 1) / (times["finished_time"] - times["first_token_time"]), out.outputs[0].token_ids


def engine_for(model: str, target: str | None, kv_bytes: int, size: int = 1) -> LLM:
    """Prefix caching off: every run computes the whole prompt, so every run routes the same tokens."""
    offload = {"expert_cache_size": size, "expert_offload_target": target} if target else {}
    return LLM(model=model, dtype="bfloat16", kv_cache_memory=kv_bytes, max_model_len=1024,
               enable_prefix_caching=False, **offload)


def memory_footprint(model: str, target: str | None, size: int, kv_bytes: int) -> dict:
    """/v1/stats/memory's figures for one engine in a fresh process (RSS of a process that held another
    engine before would count that one's freed pages too), after it generated a few tokens."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
            "from offload_sweep import engine_for, decode_run\n"
            "from localmoe.server.stats import process_rss_bytes\n"
            f"llm = engine_for({model!r}, {target!r}, {kv_bytes}, {size})\n"
            "decode_run(llm, 8)\n"
            "print(json.dumps({**llm.engine.snapshot.memory, 'process_rss_bytes': process_rss_bytes()}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    result = {"target": target, "experts_per_layer": size, "process_rss_bytes": stats["process_rss_bytes"],
              "weights_bytes": stats["weights_bytes"], "kv_cache_bytes": stats["kv_cache"]["bytes"],
              "expert_cache_budget_bytes": stats["expert_cache"]["budget_bytes"],
              "expert_store_host_bytes": stats["expert_cache"]["store_host_bytes"]}
    print(json.dumps(result), flush=True)
    return result


def sweep_target(llm: LLM, target: str, cold: bool, sizes: list[int], new_tokens: int, reference: list[int],
                 baseline: float, policies: list[str]) -> list[dict]:
    """Every (size, policy, prefetch) on one loaded engine: the store stays, caches are re-attached each time."""
    engine = llm.engine
    store = engine.experts.store
    results = []
    for size in sizes:
        for policy in policies:
            for prefetch in (False, True):
                plan = OffloadPlan(Path(), target, size, policy, prefetch)
                engine.experts.caches = attach_caches(moe_blocks(engine.model), store, plan, engine.device)
                engine.observer = RoutingObserver(engine.model)  # watching the new experts modules
                if cold:
                    store.drop_page_cache()
                speed, tokens = decode_run(llm, new_tokens)
                totals = expert_stats(engine.observer)["totals"]
                results.append({
                    "target": target, "page_cache": "cold" if cold else ("warm" if target == "disk" else None),
                    "experts_per_layer": size, "policy": policy, "prefetch": prefetch,
                    "decode_tokens_per_s": speed, "ratio_to_resident": speed / baseline,
                    "hit_rate": totals["cache_hit_rate"], "bytes_loaded": totals["bytes_loaded"],
                    "bytes_loaded_per_output_token": totals["bytes_loaded"] / new_tokens,
                    "prefetch_accuracy": totals["prefetch_accuracy"] if prefetch else None,
                    "matches_resident": tokens == reference,
                })
                print(json.dumps(results[-1]), flush=True)
    return results


class _ShapeOnlyStore(ExpertStore):
    """A host store of one-number experts: the trace replay exercises only the cache's bookkeeping."""

    def __init__(self, layers: int, experts: int) -> None:
        super().__init__("host", torch.float32, weight_map=lambda name, t: [])
        for layer in range(layers):
            self.add_layer(str(layer), experts, {"w13": (1,), "w2": (1,)})


def replay_trace(path: Path, sizes: list[int], expert_bytes: int) -> list[dict]:
    records = list(read_trace(path))
    layers = len(records[0]["experts"])
    experts = 1 + max(e for r in records for layer in r["experts"] for token in layer for e in token)
    tokens = sum(len(r["tokens"]) for r in records)
    results = []
    for size in sizes:
        for policy in POLICIES:
            store = _ShapeOnlyStore(layers, experts)
            caches = [ExpertCache(str(layer), store, size, policy, torch.device("cpu")) for layer in range(layers)]
            for record in records:
                for position in range(len(record["tokens"])):  # token by token, as one stream decodes
                    for layer, cache in enumerate(caches):
                        for _ in cache.waves(torch.tensor([record["experts"][layer][position]])):
                            pass
            hits = sum(int(c.stats.hits.sum()) for c in caches)
            misses = sum(int(c.stats.misses.sum()) for c in caches)
            results.append({"experts_per_layer": size, "of": experts, "policy": policy, "tokens": tokens,
                            "hit_rate": hits / (hits + misses),
                            "bytes_per_token_at_large_expert_size": misses * expert_bytes / tokens})
            print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, default=Path("results/offload_sweep.json"))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--kv-cache-memory", type=int, default=256 * 2**20)
    parser.add_argument("--targets", nargs="+", default=["host", "disk"], choices=["host", "disk"])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    args = parser.parse_args()
    config = json.loads((Path(args.model) / "config.json").read_text())
    num_experts = config["num_local_experts"]
    sizes = [num_experts // 2, num_experts // 4, num_experts // 8]

    resident = engine_for(args.model, None, args.kv_cache_memory)
    decode_run(resident, 4)  # warm-up: kernel build, allocator
    speed_before, reference = decode_run(resident, args.new_tokens)
    del resident
    results = []
    for target in args.targets:
        llm = engine_for(args.model, target, args.kv_cache_memory)
        expert_bytes = llm.engine.experts.caches[0].expert_bytes
        # every expert in the cache: offloading on, nothing evicted after the first touches
        results += sweep_target(llm, target, False, [num_experts], args.new_tokens, reference, speed_before,
                                args.policies)
        results += sweep_target(llm, target, False, sizes, args.new_tokens, reference, speed_before, args.policies)
        if target == "disk":
            results += sweep_target(llm, target, True, [num_experts, *sizes], args.new_tokens, reference,
                                    speed_before, args.policies)
        del llm
    resident = engine_for(args.model, None, args.kv_cache_memory)
    speed_after, _ = decode_run(resident, args.new_tokens)
    baseline = statistics.median([speed_before, speed_after])
    for r in results:
        r["ratio_to_resident"] = r["decode_tokens_per_s"] / baseline

    memory = [memory_footprint(args.model, None, 0, args.kv_cache_memory)]
    memory += [memory_footprint(args.model, target, size, args.kv_cache_memory)
               for target in args.targets for size in (sizes[0], sizes[-1])]
    report = {
        "benchmark": "offload_sweep", "model": args.model, "dtype": "bfloat16", "new_tokens": args.new_tokens,
        "device": str(resident.engine.device),
        "num_experts": num_experts, "top_k": config["num_experts_per_tok"], "expert_bytes": expert_bytes,
        "resident_decode_tokens_per_s": {"before": speed_before, "after": speed_after, "median": baseline},
        "served": results,
        "memory": memory,
        "trace_replay": {"trace": str(TRACE.relative_to(TRACE.parent.parent.parent)),
                         "source": "trained built-in model (localmoe-builtin), held-out text",
                         "results": replay_trace(TRACE, [4, 2, 1], expert_bytes)},
        "host": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__},
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

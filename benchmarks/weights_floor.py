"""How fast a decode step could be: the time to read the weights one token reads, at this host's read bandwidth.

    python benchmarks/weights_floor.py --model /tmp/bench-small

A one-stream decode step reads every weight a token touches once (attention, the router, its top-k experts of each
layer, the output head) and is bound by that read. The bandwidth is measured here, on two threads reading a
buffer of --buffer-gib (at least 1 GiB, larger than any cache), the median of five reads. Mixtral-shaped configs
(the benchmark checkpoints).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def step_weight_bytes(model_dir: str | Path, bytes_per_weight: int = 2) -> int:
    """Bytes of weights one decode token reads in a Mixtral-shaped checkpoint: attention and router of every
    layer, its top-k experts, the final norm and the output head, and one embedding row."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    d, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    head_dim = c.get("head_dim") or d // c["num_attention_heads"]
    attention = d * head_dim * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])  # q, k, v and o
    experts = c["num_experts_per_tok"] * 3 * d * c["intermediate_size"]
    per_layer = attention + d * c["num_local_experts"] + experts + 2 * d
    return (layers * per_layer + vocab * d + 2 * d) * bytes_per_weight


def read_bandwidth(buffer_gib: float = 1.5, threads: int = 2, repeats: int = 5) -> float:
    """Bytes per second of `threads` threads summing a buffer of `buffer_gib` GiB (median of `repeats`)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buffer = torch.ones(int(buffer_gib * 2**30) // 4, dtype=torch.float32)
        buffer.sum()  # pages mapped, code warm
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            buffer.sum()
            times.append(time.perf_counter() - start)
        return buffer.numel() * 4 / statistics.median(times)
    finally:
        torch.set_num_threads(previous)


def weights_floor(model_dir: str | Path, buffer_gib: float = 1.5) -> dict[str, float]:
    """The step's weight bytes, the read bandwidth and their quotient, the floor of a decode step in ms."""
    step_bytes, bandwidth = step_weight_bytes(model_dir), read_bandwidth(buffer_gib)
    return {"step_weight_bytes": step_bytes, "read_bandwidth_gb_s": bandwidth / 1e9,
            "floor_ms_per_token": step_bytes / bandwidth * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--buffer-gib", type=float, default=1.5)
    args = parser.parse_args()
    print(json.dumps(weights_floor(args.model, max(1.0, args.buffer_gib)), indent=2))


if __name__ == "__main__":
    main()

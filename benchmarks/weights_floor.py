"""How fast a decode step could be: the time to read the weights one token reads, at this host's read bandwidth.

    python benchmarks/weights_floor.py --model /tmp/bench-small

A one-stream decode step reads every weight a token touches once (attention, the router, its top-k experts of each
layer, the output head) and is bound by that read (quantized_speed.py counts quantized weights the same way). The bandwidth is measured here, on two threads reading a
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

from localmoe.quant.scheme import quant_scheme


def read_bandwidth(threads: int = 2, gib: float = 1.5, passes: int = 5) -> float:
    """Bytes/s of summing a buffer of `gib` GiB on `threads` threads (the median pass)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buffer = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
        buffer.sum()  # every page touched once before timing
        times = []
        for _ in range(passes):
            start = time.perf_counter()
            buffer.sum()
            times.append(time.perf_counter() - start)
        return buffer.numel() * 4 / statistics.median(times)
    finally:
        torch.set_num_threads(previous)


def localmoe_bytes_per_token(model_dir: Path, quantization: str | None) -> int:
    """Weight bytes one decode token of one stream reads in LocalMoE, from config.json (Mixtral's shapes): the
    attention, router and top_k experts of every layer and the output head (an embedding row aside)."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    d, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    head_dim = c.get("head_dim") or d // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    scheme = quant_scheme(quantization)

    def nbytes(rows: int, columns: int, layer_scheme=scheme) -> float:
        if layer_scheme is None:
            return rows * columns * 2
        group = layer_scheme.group_for(columns) or columns
        return rows * columns * layer_scheme.bits / 8 + rows * columns // group * 8  # float32 scale and zero

    dense = None if scheme is not None and scheme.experts_only else scheme
    attention = nbytes(q + 2 * kv, d, dense) + nbytes(d, q, dense)
    experts = c["num_experts_per_tok"] * (nbytes(2 * i, d) + nbytes(d, i))
    router = c["num_local_experts"] * d * 2
    head = nbytes(v, d, None if dense is None else dense.for_head())
    return int(c["num_hidden_layers"] * (attention + experts + router) + head)


def weights_floor(model_dir: str | Path, buffer_gib: float = 1.5) -> dict[str, float]:
    """The step's weight bytes, the read bandwidth and their quotient, the floor of a decode step in ms."""
    step_bytes, bandwidth = localmoe_bytes_per_token(Path(model_dir), None), read_bandwidth(gib=buffer_gib)
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

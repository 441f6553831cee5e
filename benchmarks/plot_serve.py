"""Draw a serve_bench.py result: output tokens/s and mean TTFT against concurrency, one line per system.

    python benchmarks/plot_serve.py results/serve_bench.json --out results/serve_bench.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("result", help="JSON written by benchmarks/serve_bench.py")
    parser.add_argument("--out", default=None, help="PNG path (default: the JSON's path with .png)")
    args = parser.parse_args()
    report = json.loads(Path(args.result).read_text())
    out = Path(args.out or Path(args.result).with_suffix(".png"))

    fig, (tput, ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, levels in report["systems"].items():
        concurrency = sorted(int(c) for c in levels)
        tput.plot(concurrency, [levels[str(c)]["output_throughput"] for c in concurrency], marker="o", label=name)
        ttft.plot(concurrency, [levels[str(c)]["mean_ttft_ms"] for c in concurrency], marker="o", label=name)
    load = report["load"]
    for ax, label in ((tput, "output tokens/s"), (ttft, "mean time to first token (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(load["concurrency"], [str(c) for c in load["concurrency"]])
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{load['input_len']} prompt / {load['output_len']} output tokens per request, "
                 f"{report['machine']['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Draw a serve_bench.py result: output tokens/s and mean TTFT against concurrency, one line per system.

    python benchmarks/plot_serve.py results/serve_bench.json --out results/serve_bench.png
"""

from __future__ import annotations


from plotting import result_and_output  # first: it picks matplotlib's file-only backend

import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    report, out = result_and_output("serve_bench.py")

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

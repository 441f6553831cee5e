"""Draw a larger_than_memory.py result: decode tokens/s of LocalMoE (experts on disk) and llama.cpp (mmap) inside
the same memory limit, one group of bars per (limit, concurrency), LocalMoE's ratio written above its bar.

    python benchmarks/plot_larger_than_memory.py results/larger_than_memory.json
"""

from __future__ import annotations

from plotting import result_and_output  # first: it picks matplotlib's file-only backend

import matplotlib.pyplot as plt  # noqa: E402

SYSTEMS = {"localmoe": ("LocalMoE, experts on disk", "tab:blue"), "llama.cpp": ("llama.cpp, mmap", "tab:gray")}


def main() -> None:
    report, out = result_and_output("larger_than_memory.py")
    groups = [(r["fraction"], r["concurrency"]) for r in report["ratios"]]
    fig, ax = plt.subplots(figsize=(2.2 * len(groups) + 2, 4.4))
    width = 0.38
    for offset, (system, (label, color)) in zip((-width / 2, width / 2), SYSTEMS.items()):
        values = []
        for fraction, concurrency in groups:
            level = next(r for r in report["levels"] if r["system"] == system and r["fraction"] == fraction
                         and r["concurrency"] == concurrency)
            values.append(level["decode_tokens_per_s"] or 0.0)
        bars = ax.bar([i + offset for i in range(len(groups))], values, width, label=label, color=color)
        if system == "localmoe":
            for bar, row in zip(bars, report["ratios"]):
                note = f"{row['ratio']:.1f}x" if row["ratio"] else "did not start"
                ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=9)
    gib = report["checkpoint_bytes"] / 2**30
    ax.set_xticks(range(len(groups)), [f"limit {f:g} x {gib:.2f} GiB\nconcurrency {c}" for f, c in groups])
    ax.set_ylabel("decode tokens/s (all streams)")
    ax.set_title("A model larger than its memory limit (bf16 checkpoint, memory cgroup, page cache dropped)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

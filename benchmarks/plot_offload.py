"""Draw an offload_sweep.py result: decode tokens/s and hit rate against the expert cache's size, one line per
(offload target, policy), prefetch dashed; and the hit rates of the recorded-trace replay.

    python benchmarks/plot_offload.py results/offload_sweep.json --out results/offload_sweep.png
"""

from __future__ import annotations

from pathlib import Path

from plotting import result_and_output  # first: it picks matplotlib's file-only backend

import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"host": "tab:blue", "disk warm": "tab:orange", "disk cold": "tab:red"}
MARKERS = {"lru": "o", "lfu": "s", "lfru": "^"}


def main() -> None:
    report, out = result_and_output("offload_sweep.py")
    experts = report["num_experts"]

    fig, (speed, hits, trace) = plt.subplots(1, 3, figsize=(16, 4.6))
    runs = report["served"]
    for where in COLORS:
        for policy, marker in MARKERS.items():
            for prefetch in (False, True):
                chosen = sorted((r for r in runs if f"{r['target']} {r['page_cache']}".replace(" None", "") == where
                                 and r["policy"] == policy and r["prefetch"] == prefetch),
                                key=lambda r: r["experts_per_layer"])
                if not chosen:
                    continue
                sizes = [r["experts_per_layer"] for r in chosen]
                style = dict(color=COLORS[where], marker=marker, linestyle="--" if prefetch else "-", alpha=0.85,
                             label=f"{where}, {policy}{', prefetch' if prefetch else ''}")
                speed.plot(sizes, [r["decode_tokens_per_s"] for r in chosen], **style)
                hits.plot(sizes, [r["hit_rate"] for r in chosen], **style)
    speed.axhline(report["resident_decode_tokens_per_s"]["median"], color="black", linewidth=1,
                  label="all experts resident, no offloading")
    for policy, marker in MARKERS.items():
        chosen = sorted((r for r in report["trace_replay"]["results"] if r["policy"] == policy),
                        key=lambda r: r["experts_per_layer"])
        trace.plot([r["experts_per_layer"] for r in chosen], [r["hit_rate"] for r in chosen], marker=marker,
                   label=policy)
    for ax, label, title in (
            (speed, "decode tokens/s (one stream, bf16)", "served: random-weight checkpoint"),
            (hits, "expert cache hit rate", "served: hit rate"),
            (trace, "expert cache hit rate", "replayed trace of the trained built-in model")):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
        ax.set_xlabel(f"experts per layer in the cache (of {experts})")
        ax.set_ylabel(label)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    speed.legend(fontsize=6, ncol=2)
    trace.legend()
    fig.suptitle(f"Expert offloading sweep, {Path(report['model']).name}, top-{report['top_k']} of {experts} experts")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""/dashboard: a live page of what the experts do, drawn from /v1/stats/experts and /v1/stats/performance.

A heatmap of MoE layers (rows) by experts (columns), each cell the share of its layer's routed tokens (dark:
none, bright yellow: the layer's hottest), the expert cache's hit rate over time beside throughput and TTFT.
The layout is fixed (cell positions below) so a screenshot can be read back pixel by pixel in the tests.
"""

from __future__ import annotations

from pathlib import Path

HEATMAP_LEFT, HEATMAP_TOP = 24, 96  # page position of the heatmap canvas (CSS px)
LABEL_WIDTH, HEADER_HEIGHT = 56, 20  # row labels and column header inside the canvas
CELL = 24  # px per (layer, expert) cell
REFRESH_MS = 1000


def cell_center(row: int, expert: int) -> tuple[int, int]:
    """Page coordinates of the middle of a heatmap cell (row: the MoE layer's position in depth order)."""
    return (HEATMAP_LEFT + LABEL_WIDTH + expert * CELL + CELL // 2,
            HEATMAP_TOP + HEADER_HEIGHT + row * CELL + CELL // 2)


def _page() -> str:
    template = Path(__file__).with_name("dashboard.html").read_text()
    for key, value in {"HEATMAP_LEFT": HEATMAP_LEFT, "HEATMAP_TOP": HEATMAP_TOP, "LABEL_WIDTH": LABEL_WIDTH,
                       "HEADER_HEIGHT": HEADER_HEIGHT, "CELL": CELL, "REFRESH_MS": REFRESH_MS}.items():
        template = template.replace(f"{{{{{key}}}}}", str(value))
    return template


DASHBOARD_PAGE = _page()

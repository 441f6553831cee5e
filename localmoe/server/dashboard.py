"""/dashboard: a live page of what an operator watches, drawn from /v1/stats/history and /v1/stats/experts.

Charts of the last minutes (queue and running requests, KV cache usage, request rate and errors, TTFT and TPOT
percentiles, memory, token throughput, the expert cache's hit rate), from the samples the server keeps of the
engine's published stats; under them a heatmap of MoE layers (rows) by experts (columns), each cell the share of its
layer's routed tokens (dark: none, bright yellow: the hottest expert), its numbers on hover, and its colour scale.
Plain SVG, no script from elsewhere. The layout is fixed (positions below) so that a screenshot can be read back
pixel by pixel in the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

from localmoe.server.stats import HISTORY_INTERVAL_S, HISTORY_LENGTH

LEFT, TOP = 24, 72  # page position of the first panel (CSS px)
CHART_WIDTH, CHART_HEIGHT = 300, 110
CHART_TOP = 40  # the chart's top inside its panel, under the title and the current values
PANEL_WIDTH, PANEL_HEIGHT = CHART_WIDTH + 24, CHART_TOP + CHART_HEIGHT + 40  # with the legend and a gap
COLUMNS = 4
PANELS = (("queue", "Queue and running"), ("kv", "KV cache usage"), ("requests", "Requests and errors"),
          ("ttft", "Time to first token"), ("tpot", "Time per output token"), ("memory", "Memory"),
          ("throughput", "Token throughput"), ("hitrate", "Expert cache hit rate"))
HEATMAP_TOP = TOP + (len(PANELS) + COLUMNS - 1) // COLUMNS * PANEL_HEIGHT + 8
LABEL_WIDTH, HEADER_HEIGHT = 56, 20  # row labels and column header inside the heatmap
CELL = 24  # px per (layer, expert) cell
LEGEND_GAP, LEGEND_HEIGHT = 16, 12  # the colour scale under the heatmap: its distance, its bar's height
REFRESH_MS = 1000


def panel_origin(index: int) -> tuple[int, int]:
    return LEFT + index % COLUMNS * PANEL_WIDTH, TOP + index // COLUMNS * PANEL_HEIGHT


def chart_box(panel_id: str) -> tuple[int, int, int, int]:
    """Page box (left, top, right, bottom) of a panel's chart."""
    left, top = panel_origin([p for p, _ in PANELS].index(panel_id))
    return left, top + CHART_TOP, left + CHART_WIDTH, top + CHART_TOP + CHART_HEIGHT


def cell_center(row: int, expert: int) -> tuple[int, int]:
    """Page coordinates of the middle of a heatmap cell (row: the MoE layer's position in depth order)."""
    return (LEFT + LABEL_WIDTH + expert * CELL + CELL // 2,
            HEATMAP_TOP + HEADER_HEIGHT + row * CELL + CELL // 2)


def legend_box(num_layers: int) -> tuple[int, int, int, int]:
    """Page box (left, top, right, bottom) of the heatmap's colour scale bar."""
    top = HEATMAP_TOP + HEADER_HEIGHT + num_layers * CELL + LEGEND_GAP
    return LEFT, top, LEFT + CHART_WIDTH, top + LEGEND_HEIGHT


def _page() -> str:
    template = Path(__file__).with_name("dashboard.html").read_text()
    panels = [[panel_id, title, *panel_origin(i)] for i, (panel_id, title) in enumerate(PANELS)]
    for key, value in {"LEFT": LEFT, "HEATMAP_TOP": HEATMAP_TOP, "LABEL_WIDTH": LABEL_WIDTH,
                       "HEADER_HEIGHT": HEADER_HEIGHT, "CELL": CELL, "REFRESH_MS": REFRESH_MS,
                       "LEGEND_GAP": LEGEND_GAP, "LEGEND_HEIGHT": LEGEND_HEIGHT,
                       "CHART_WIDTH": CHART_WIDTH, "CHART_HEIGHT": CHART_HEIGHT, "CHART_TOP": CHART_TOP,
                       "LEGEND_TOP": CHART_TOP + CHART_HEIGHT + 4, "PANELS": json.dumps(panels),
                       "HISTORY_S": round(HISTORY_INTERVAL_S * HISTORY_LENGTH)}.items():
        template = template.replace(f"{{{{{key}}}}}", str(value))
    return template


DASHBOARD_PAGE = _page()

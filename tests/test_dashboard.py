"""/dashboard rendered by Debian's headless Chromium after traffic: every panel has data (the values it prints, the
lines it draws, read from the DOM and from the screenshot's pixels), the heatmap draws the hot expert hotter, carries
its numbers on hover (SVG titles) and its colour scale."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from checkpoints import make_checkpoint
from localmoe.server.dashboard import PANELS, chart_box, cell_center, legend_box
from server_process import API_KEY, auth
from test_server import running_server

HOT_PROMPT = "a" * 40  # one token over and over: its tokens mostly pick the same experts
WINDOW = (1400, 700)


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> Iterator[str]:
    """8 experts, 2 slots per layer, read from the checkpoint file on a miss (the hit-rate panel has lookups to
    show); no prefix caching, so every repeat of the hot prompt routes its tokens again."""
    directory = make_checkpoint(tmp_path_factory.mktemp("dashboard-model"), "mixtral", seed=4, num_local_experts=8)
    with running_server(directory, tmp_path_factory.mktemp("dashboard-server"), "--expert-cache-size", "2",
                        "--expert-offload-target", "disk", "--no-enable-prefix-caching") as url:
        yield url


def history(url: str) -> list[dict]:
    response = httpx.get(f"{url}/v1/stats/history", headers=auth())
    assert response.status_code == 200
    return response.json()["samples"]


@pytest.fixture(scope="module")
def traffic(url: str) -> list[dict]:
    """Completions, a longer one running beside short ones, some refused (4xx), until the history holds a sample
    of each kind of activity and at least two samples."""
    model = httpx.get(f"{url}/v1/models", headers=auth()).json()["data"][0]["id"]
    wanted = ("running", "kv_cache_usage", "requests_per_s", "client_errors_per_s", "generation_tokens_per_s",
              "prompt_tokens_per_s", "expert_cache_hit_rate", "ttft_s", "tpot_s")

    def complete(max_tokens: int) -> None:
        response = httpx.post(f"{url}/v1/completions", headers=auth(), timeout=120, json={
            "model": model, "prompt": HOT_PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
        assert response.status_code == 200

    deadline = time.monotonic() + 300
    while True:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(complete, (24, 4, 4, 4)))
        assert httpx.post(f"{url}/v1/completions", headers=auth(),
                          json={"model": "no-such-model", "prompt": "x"}).status_code == 404
        samples = history(url)
        # a chart's line needs two samples: the history takes one every 2 s, and a fast run can be done in one
        if len(samples) >= 2 and all(any(s[key] for s in samples) for key in wanted):
            return samples
        assert time.monotonic() < deadline, samples


def chromium(url: str, profile: Path, *output: str) -> str:
    result = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--hide-scrollbars", f"--window-size={WINDOW[0]},{WINDOW[1]}",
         "--force-device-scale-factor=1", "--virtual-time-budget=5000", *output,
         url.replace("://", f"://localmoe:{API_KEY}@") + "/dashboard"],
        check=True, capture_output=True, text=True, timeout=120)
    return result.stdout


def luminance(pixel: tuple[int, ...]) -> float:
    r, g, b = pixel[:3]
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def saturated(pixel: tuple[int, ...]) -> bool:
    """A series' colour, never the page's greys (background, grid, text)."""
    return max(pixel[:3]) - min(pixel[:3]) > 100


needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None,
                                    reason="needs Debian's chromium (installed by .ci/run)")


@needs_chromium
def test_every_panel_has_data_and_the_heatmap_its_numbers_and_scale(url, traffic, tmp_path):
    experts = httpx.get(f"{url}/v1/stats/experts", headers=auth()).json()["layers"]
    dom = chromium(url, tmp_path / "profile", "--dump-dom")
    summary = re.search(r'<div id="summary">([^<]*)<', dom)[1]
    assert "tokens routed" in summary and "unavailable" not in summary, summary
    panels = dict(re.findall(r'data-panel="(\w+)"(.*?)(?=data-panel="|<svg id="heatmap")', dom, re.S))
    assert set(panels) == {panel_id for panel_id, _ in PANELS}
    for panel_id, html in panels.items():
        value = re.search(r'class="value"[^>]*>([^<]*)<', html)[1]
        assert value != "-" and re.search(r"\d", value), (panel_id, value)
        lines = re.findall(r'<polyline points="([^"]+)"', html)
        assert lines and all(len(points.split()) >= 2 for points in lines), panel_id
    # the heatmap's numbers on hover: a title per (layer, expert) cell, with the tokens /v1/stats/experts counts
    titles = re.findall(r"<title>layer (\d+), expert (\d+): (\d+) tokens, ([\d.]+)% of the layer</title>", dom)
    assert len(titles) == sum(layer["num_experts"] for layer in experts)
    by_cell = {(int(layer), int(expert)): int(tokens) for layer, expert, tokens, _ in titles}
    assert all(by_cell[layer["layer"], e] == n for layer in experts for e, n in enumerate(layer["tokens"]))
    legend = re.search(r'<svg id="heatmap-legend".*?</svg>', dom, re.S)[0]
    assert "linearGradient" in legend and "0% of a layer's tokens" in legend and "(the hottest expert)" in legend


@needs_chromium
def test_dashboard_draws_lines_the_hot_expert_hotter_and_the_colour_scale(url, traffic, tmp_path):
    from PIL import Image

    layers = httpx.get(f"{url}/v1/stats/experts", headers=auth()).json()["layers"]
    row = 0
    tokens = layers[row]["tokens"]
    hot, cold = tokens.index(max(tokens)), tokens.index(min(tokens))
    assert max(tokens) > 2 * min(tokens)  # the repeated prompt made one expert hot
    shot = tmp_path / "dashboard.png"
    chromium(url, tmp_path / "profile", f"--screenshot={shot}")
    image = Image.open(shot).convert("RGB")
    hot_pixel, cold_pixel = image.getpixel(cell_center(row, hot)), image.getpixel(cell_center(row, cold))
    assert luminance(hot_pixel) > luminance(cold_pixel) + 60, (hot_pixel, cold_pixel)
    # every expert of every layer has a cell: the last layer's last cell is drawn too (not page background)
    assert image.getpixel(cell_center(len(layers) - 1, 7)) != image.getpixel((5, WINDOW[1] - 10))
    for panel_id, _ in PANELS:  # each chart draws at least one line in a series' colour
        left, top, right, bottom = chart_box(panel_id)
        assert any(saturated(image.getpixel((x, y))) for x in range(left, right) for y in range(top, bottom)), \
            panel_id
    left, top, right, bottom = legend_box(len(layers))  # the colour scale runs from dark to bright
    middle = (top + bottom) // 2
    assert luminance(image.getpixel((right - 3, middle))) > luminance(image.getpixel((left + 3, middle))) + 120


def test_history_needs_the_api_key_and_keeps_the_last_minutes(url, traffic):
    assert httpx.get(f"{url}/v1/stats/history").status_code == 401
    samples = history(url)
    ages = [s["age_s"] for s in samples]
    assert ages == sorted(ages, reverse=True) and 0 <= ages[-1] < ages[0]  # oldest first, newest last
    assert all(s["process_rss_bytes"] > 0 and s["requests_per_s"] >= 0 for s in samples)

"""What the plot scripts share: read a benchmark's JSON named on the command line, and where the PNG goes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: files only


def result_and_output(writer: str) -> tuple[dict, Path]:
    """The JSON report `writer` wrote (first argument) and the PNG path (--out, default: beside the JSON)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("result", help=f"JSON written by benchmarks/{writer}")
    parser.add_argument("--out", default=None, help="PNG path (default: the JSON's path with .png)")
    args = parser.parse_args()
    return json.loads(Path(args.result).read_text()), Path(args.out or Path(args.result).with_suffix(".png"))

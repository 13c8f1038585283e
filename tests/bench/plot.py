"""Draw the results of ``all.py --json FILE`` as docs/img/performance.png.

A horizontal bar chart of the median req/s of every target (log scale when they span more
than a factor of 20), each bar annotated with req/s and server CPU µs per request; cachegw's
own targets in one colour, fastapi-cache2 in another, baselines in grey.

    .venv/bin/python tests/bench/all.py --json /tmp/bench.json
    .venv/bin/python tests/bench/plot.py /tmp/bench.json [--out docs/img/performance.png]

Needs matplotlib, which is NOT a dependency of cachegw (nor of its dev extra): install it
into the virtual environment first with ``.venv/bin/pip install matplotlib``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "docs" / "img" / "performance.png"
COLOURS = {"cachegw": "#1f77b4", "fastapi-cache2": "#d62728", "nginx": "#2ca02c", "": "#9e9e9e"}


def family(key: str) -> str:
    if key.startswith(("gw_", "serve_", "cached_")):
        return "cachegw"
    if key.startswith("fc2_"):
        return "fastapi-cache2"
    if key == "nginx" or key.startswith("nginx_"):
        return "nginx"
    return ""


def plot(doc: dict[str, Any], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        sys.exit(
            "plot.py needs matplotlib, which cachegw does not depend on.\n"
            "Install it into the virtual environment:  .venv/bin/pip install matplotlib"
        )
    targets = sorted(doc["targets"], key=lambda t: t["median"]["rps"])
    names = [t["name"] for t in targets]
    rps = [t["median"]["rps"] for t in targets]
    cpu = [t["median"]["cpu_us_per_req"] for t in targets]
    colours = [COLOURS[family(t["key"])] for t in targets]
    log = max(rps) / max(1.0, min(rps)) > 20

    fig, ax = plt.subplots(figsize=(10, 0.45 * len(targets) + 1.8), dpi=120)
    bars = ax.barh(names, rps, color=colours)
    if log:
        ax.set_xscale("log")
        ax.set_xlim(min(rps) / 2, max(rps) * 6)
    else:
        ax.set_xlim(0, max(rps) * 1.35)
    for bar, value, us in zip(bars, rps, cpu, strict=True):
        ax.text(
            bar.get_width() * (1.08 if log else 1.0) + (0 if log else max(rps) * 0.01),
            bar.get_y() + bar.get_height() / 2,
            f"{value:,.0f} req/s  ({us:,.0f} µs CPU/req)",
            va="center",
            fontsize=8,
        )
    ax.set_xlabel("requests per second, median" + (" (log scale)" if log else ""))
    ax.set_title(
        f"1 KiB JSON, {doc['connections']} connections, server on 1 core, "
        f"{doc['rounds']} rounds x {doc['seconds']:g} s ({doc['time'][:10]})",
        fontsize=10,
    )
    ax.legend(
        handles=[
            Patch(color=c, label=label or "baselines (no cache)") for label, c in COLOURS.items()
        ],
        loc="lower right",
        fontsize=8,
    )
    ax.grid(axis="x", which="both", alpha=0.25)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="the file written by all.py --json")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write")
    args = parser.parse_args()
    plot(json.loads(args.json.read_text()), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

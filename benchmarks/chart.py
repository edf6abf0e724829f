"""Bar chart of the benchmark: peer time / camlens time per case (log scale; > 1: camlens is faster).

    python -m benchmarks.chart benchmarks/results/cpu.json [--out cpu.png]

Called by :mod:`benchmarks.run` at the end; also runs alone from the JSON file it writes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

COLORS = {"pytorch-grad-cam": "#d95f02", "torchcam": "#1b9e77", "torchcam (per-class loop)": "#66c2a5",
          "captum": "#7570b3"}


def plot(res: dict[str, Any], out: Path) -> Path:
    """One group of horizontal bars per row (case) that has timed peers, one bar per peer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups = [(r["title"], [(p, e["ratio"]) for p, e in r["peers"].items() if e.get("ratio")])
              for r in res["rows"]]
    groups = [(t, bars) for t, bars in groups if bars]
    peers = list(dict.fromkeys(p for _, bars in groups for p, _ in bars))
    n_bars = sum(len(b) for _, b in groups)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.28 * n_bars + 0.25 * len(groups)))
    y, ticks, labels, seen = 0.0, [], [], set()
    for title, bars in groups:
        start = y
        for p, ratio in bars:
            ax.barh(y, ratio, height=0.8, color=COLORS.get(p, "#999999"), label=None if p in seen else p)
            ax.text(ratio * 1.03, y, f"{ratio:.2f}", va="center", fontsize=7)
            seen.add(p)
            y += 1
        ticks.append((start + y - 1) / 2)
        labels.append(title)
        y += 0.8  # gap between groups
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xscale("log")
    ratios = [r for _, bars in groups for _, r in bars] or [1.0]
    lo, hi = min(0.5, min(ratios) / 1.5), max(2.0, max(ratios) * 2.0)
    ax.set_xlim(lo, hi)
    ticks_x = [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if lo <= t <= hi]
    ax.set_xticks(ticks_x, [f"{t:g}" for t in ticks_x])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("peer time / camlens time (log scale; > 1: camlens is faster)")
    meta = res.get("meta", {})
    ax.set_title(f"camlens vs peers — {meta.get('device', '?')}, {meta.get('processor', '')}, "
                 f"{meta.get('threads', '?')} threads, torch {meta.get('torch', '?')}"
                 + (" (smoke)" if meta.get("smoke") else ""), fontsize=9)
    handles, names = ax.get_legend_handles_labels()
    order = [names.index(p) for p in peers if p in names]
    ax.legend([handles[i] for i in order], [names[i] for i in order], fontsize=7, loc="lower right")
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path, help="results file written by benchmarks.run")
    ap.add_argument("--out", type=Path, default=None, help="PNG path (default: next to the JSON)")
    args = ap.parse_args(argv)
    out = plot(json.loads(args.json.read_text()), args.out or args.json.with_suffix(".png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

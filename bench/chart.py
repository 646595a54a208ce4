"""The PNG chart: tokens/s per workload for the server, the naive server, the ceilings and the floor."""

from __future__ import annotations

import math
from pathlib import Path

from .report import SYSTEM_LABELS, Summary, workload_order

_COLORS = {"server": "#1f77b4", "naive": "#ff7f0e", "echo": "#7f7f7f", "floor": "#9467bd", "raw": "#2ca02c"}


def write_chart(summaries: list[Summary], path: Path, title: str) -> Path:
    """Grouped bars (log scale), one group per workload, one bar per system measured on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = sorted({s.workload for s in summaries}, key=workload_order)
    systems = [t for t in SYSTEM_LABELS if any(s.target == t for s in summaries)]
    # The echo runs no model: its prefill "tokens/s" is only transport and would flatten every other bar.
    value = {(s.target, s.workload): s.tokens_per_s for s in summaries
             if not (s.target == "echo" and s.workload.startswith("prefill"))}
    width = 0.8 / max(1, len(systems))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(workloads) + 2), 4.6), dpi=110)
    for k, system in enumerate(systems):
        xs, ys = [], []
        for i, w in enumerate(workloads):
            v = value.get((system, w))
            if v is not None and not math.isnan(v) and v > 0:
                xs.append(i - 0.4 + width * (k + 0.5))
                ys.append(v)
        bars = ax.bar(xs, ys, width, label=SYSTEM_LABELS[system], color=_COLORS[system])
        for bar, y in zip(bars, ys):
            ax.annotate(f"{y / 1000:.1f}k" if y >= 1000 else f"{y:.0f}", (bar.get_x() + bar.get_width() / 2, y),
                        ha="center", va="bottom", fontsize=6.5, rotation=90, xytext=(0, 2), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels(workloads)
    ax.set_ylabel("tokens/s (median over repeats, log scale)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", ncols=2)
    ax.grid(axis="y", which="both", alpha=0.25)
    shown = [v for v in value.values() if v and not math.isnan(v)] or [1.0]
    ax.set_ylim(bottom=min(shown) / 3, top=max(shown) * 6)  # room for the labels above the bars
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path

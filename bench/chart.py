"""The PNG chart: tokens/s per workload for the server, the naive server, the ceilings and the floor,
and beside it one session's p50 step latency against raw ORT + echo (the latency target)."""

from __future__ import annotations

import math
from pathlib import Path

from .report import SYSTEM_LABELS, Summary, workload_order

_COLORS = {
    "server": "#1f77b4",
    "naive": "#ff7f0e",
    "echo": "#7f7f7f",
    "floor": "#9467bd",
    "raw": "#2ca02c",
    "raw-beside": "#98df8a",
    "metrics": "#17becf",
    "naive-beside": "#ffbb78",  # each baseline's run right after the server: its lighter shade
    "echo-beside": "#c7c7c7",
    "metrics-beside": "#9edae5",
}


def write_chart(summaries: list[Summary], path: Path, title: str) -> Path:
    """Grouped bars (log scale), one group per workload, one bar per system measured on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = sorted({s.workload for s in summaries}, key=workload_order)
    systems = [t for t in SYSTEM_LABELS if any(s.target == t for s in summaries)]
    # The echo runs no model: its prefill "tokens/s" is only transport and would flatten every other bar.
    value = {
        (s.target, s.workload): s.tokens_per_s
        for s in summaries
        if not (s.target == "echo" and s.workload.startswith("prefill"))
    }
    width = 0.8 / max(1, len(systems))
    lone = _lone_latencies(summaries)
    if lone:
        fig, (ax, lat_ax) = plt.subplots(
            1,
            2,
            figsize=(max(7.0, 1.3 * len(workloads) + 2) + 3.4, 4.6),
            dpi=110,
            gridspec_kw={"width_ratios": [max(5.0, 1.3 * len(workloads)), 2.4]},
        )
        _latency_panel(lat_ax, *lone)
    else:
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
            ax.annotate(
                f"{y / 1000:.1f}k" if y >= 1000 else f"{y:.0f}",
                (bar.get_x() + bar.get_width() / 2, y),
                ha="center",
                va="bottom",
                fontsize=6.5,
                rotation=90,
                xytext=(0, 2),
                textcoords="offset points",
            )
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


def _lone_latencies(summaries: list[Summary]) -> tuple[str, dict[str, float]] | None:
    """The smallest streaming workload's p50 per system, if the server, raw loop and echo ran it."""
    streams = sorted((s.workload for s in summaries if s.workload.startswith("stream-")), key=workload_order)
    if not streams:
        return None
    p50 = {s.target: s.p50_ms for s in summaries if s.workload == streams[0] and not math.isnan(s.p50_ms)}
    return (streams[0], p50) if {"server", "raw", "echo"} <= p50.keys() else None


def _latency_panel(ax, workload: str, p50: dict[str, float]) -> None:
    """Horizontal p50 bars for one session, with raw ORT + echo stacked and the target's limit."""
    rows = [t for t in ("server", "naive", "floor") if t in p50]
    labels = [SYSTEM_LABELS[t] for t in rows] + ["raw ORT + echo"]
    for i, t in enumerate(rows):
        ax.barh(i, p50[t], color=_COLORS[t])
        ax.annotate(f"{p50[t]:.3f}", (p50[t], i), va="center", fontsize=7, xytext=(3, 0), textcoords="offset points")
    both = len(rows)
    ax.barh(both, p50["raw"], color=_COLORS["raw"])
    ax.barh(both, p50["echo"], left=p50["raw"], color=_COLORS["echo"])
    total = p50["raw"] + p50["echo"]
    ax.annotate(f"{total:.3f}", (total, both), va="center", fontsize=7, xytext=(3, 0), textcoords="offset points")
    ax.axvline(total + 0.15, color="#d62728", linestyle="--", linewidth=1)
    ax.annotate(
        "target",
        (total + 0.15, -0.5),
        fontsize=7,
        color="#d62728",
        ha="left",
        va="top",
        xytext=(2, -2),
        textcoords="offset points",
    )
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, max(max(p50.values()), total + 0.15) * 1.3)
    ax.set_xlabel("p50 ms per step")
    ax.set_title(f"one session ({workload})", fontsize=10)
    ax.grid(axis="x", alpha=0.25)

"""Summaries, the markdown table and the PNG plots of the cell study, from its run records."""

from __future__ import annotations

import statistics
from pathlib import Path

from .study_tasks import ADDING_BASELINE_MSE

# task -> (metric key in a run's "test" record, what it is, reference value and its name)
METRICS = {
    "adding": ("mse", "test MSE", ADDING_BASELINE_MSE, "predicting the mean"),
    "copy": ("accuracy", "test accuracy per letter", None, "chance"),
}
CELL_COLOURS = {"rnn": "tab:red", "lstm": "tab:blue", "gru": "tab:green"}


def reference_value(task: str, runs: list[dict]) -> float:
    """The trivial baseline: 1/6 MSE for adding, 1/alphabet accuracy for copy."""
    if task == "adding":
        return ADDING_BASELINE_MSE
    return next(r["test"]["chance"] for r in runs if r["task"] == task)


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (task, cell, length): the metric's mean, std, min and max over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["task"], run["cell"], run["length"]), []).append(run)
    rows = []
    for (task, cell, length), members in sorted(groups.items()):
        key = METRICS[task][0]
        values = [m["test"][key] for m in sorted(members, key=lambda m: m["seed"])]
        rows.append(
            {
                "task": task,
                "cell": cell,
                "length": length,
                "metric": key,
                "seeds": [m["seed"] for m in members],
                "values": values,
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
                "reference": reference_value(task, runs),
                "seconds_mean": statistics.fmean(m["seconds"] for m in members),
            }
        )
    return rows


def _fmt(value: float, task: str) -> str:
    return f"{value:.4f}" if task == "adding" else f"{value:.3f}"


def markdown_table(summary: list[dict], sizes: dict[str, dict[str, dict[str, int]]], steps: int) -> str:
    """One table per task: lengths down, cells across, ``mean ± std [min, max]`` in each cell."""
    lines = []
    for task in [t for t in METRICS if any(r["task"] == t for r in summary)]:
        rows = [r for r in summary if r["task"] == task]
        cells = [c for c in ("rnn", "lstm", "gru") if any(r["cell"] == c for r in rows)]
        key, label, _, ref_name = METRICS[task]
        seeds = max(len(r["values"]) for r in rows)
        ref = rows[0]["reference"]
        lines.append(
            f"**{task}** — {label}, mean ± std [min, max] over {seeds} seed(s), {steps} training steps; "
            f"{ref_name}: {_fmt(ref, task)}"
        )
        lines.append("")
        header = [f"{c} (h={sizes[task][c]['hidden']}, {sizes[task][c]['parameters']:,} params)" for c in cells]
        lines.append("| length | " + " | ".join(header) + " |")
        lines.append("|---:|" + "---|" * len(cells))
        for length in sorted({r["length"] for r in rows}):
            entries = []
            for cell in cells:
                row = next((r for r in rows if r["cell"] == cell and r["length"] == length), None)
                entries.append(
                    "—"
                    if row is None
                    else f"{_fmt(row['mean'], task)} ± {_fmt(row['std'], task)} "
                    f"[{_fmt(row['min'], task)}, {_fmt(row['max'], task)}]"
                )
            lines.append(f"| {length} | " + " | ".join(entries) + " |")
        lines.append("")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(summary: list[dict], path: Path) -> Path:
    """Metric vs sequence length, one line per cell, bars spanning min..max over seeds."""
    plt = _pyplot()
    tasks = [t for t in METRICS if any(r["task"] == t for r in summary)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        key, label, _, ref_name = METRICS[task]
        rows = [r for r in summary if r["task"] == task]
        for cell in ("rnn", "lstm", "gru"):
            mine = sorted((r for r in rows if r["cell"] == cell), key=lambda r: r["length"])
            if not mine:
                continue
            x = [r["length"] for r in mine]
            y = [r["mean"] for r in mine]
            err = [[r["mean"] - r["min"] for r in mine], [r["max"] - r["mean"] for r in mine]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=cell, color=CELL_COLOURS.get(cell))
        ax.axhline(rows[0]["reference"], color="gray", linestyle="--", label=ref_name)
        ax.set_xscale("log")
        lengths = sorted({r["length"] for r in rows})
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        if task == "adding":
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, 1.05)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.set_title(f"{task}: mean over seeds, bars = min..max")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_gradients(probes: list[dict], path: Path) -> Path:
    """||dL/dx_t|| vs distance from the last step: one row per task, one column per probe point."""
    plt = _pyplot()
    tasks = [t for t in METRICS if any(p["task"] == t for p in probes)]
    points = sorted({int(s) for p in probes for s in p["grad_by_distance"]})
    fig, axes = plt.subplots(
        len(tasks), len(points), figsize=(3.6 * len(points), 3.3 * len(tasks)), squeeze=False, sharey="row"
    )
    for i, task in enumerate(tasks):
        for j, step in enumerate(points):
            ax = axes[i][j]
            for probe in (p for p in probes if p["task"] == task):
                norms = probe["grad_by_distance"].get(str(step))
                if norms is None:
                    continue
                shown = [max(v, 1e-30) for v in norms]  # log axis: exact zeros (underflow) drawn at 1e-30
                ax.plot(range(len(shown)), shown, label=probe["cell"], color=CELL_COLOURS.get(probe["cell"]))
            ax.set_yscale("log")
            ax.set_title(f"{task}, length {probes[0]['length']}, step {step}", fontsize=9)
            ax.set_xlabel("distance from last step")
            if j == 0:
                ax.set_ylabel("mean ||dL/dx_t||")
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def gradient_table(probes: list[dict]) -> str:
    """Markdown: gradient norm at a few distances (up to the sequence start), per task, cell and probe point."""
    length = probes[0]["length"]
    distances = sorted({d for d in (0, 10, 50, 100, 200, 500) if d < length} | {length - 1})
    lines = [
        "| task | cell | step | " + " | ".join(f"d={d}" for d in distances) + " |",
        "|---|---|---:|" + "---:|" * len(distances),
    ]
    for probe in sorted(probes, key=lambda p: (p["task"], p["cell"])):
        for step, norms in sorted(probe["grad_by_distance"].items(), key=lambda kv: int(kv[0])):
            values = [f"{norms[d]:.1e}" if d < len(norms) else "—" for d in distances]
            lines.append(f"| {probe['task']} | {probe['cell']} | {step} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"

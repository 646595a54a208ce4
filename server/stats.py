"""Counters and histograms the serving code keeps as it works, read when metrics are scraped.

They are plain Python and numpy, updated once per model run, once per step answered or once per
session ended, at the cost of an increment and a bucket search; nothing here knows Prometheus.
server/api/metrics.py reads them at scrape time and turns them into metric families, so a server
with metrics off does the same work as one with metrics on, minus the scrapes.
"""

from __future__ import annotations

from bisect import bisect_left

import numpy as np

# Seconds: 50 µs (one small step on a quiet CPU) up to 10 s (a long prompt on a busy one).
LATENCY_BOUNDS = (
    5e-05,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
)
# Rows per model run: powers of two minus one, so each bucket doubles the one before.
ROWS_BOUNDS = tuple(float(2**i - 1) for i in range(1, 13))
# Session age at its end: seconds to a day (sessions live from one request to many hours).
AGE_BOUNDS = (1, 10, 60, 300, 600, 1800, 3600, 10800, 43200, 86400)


class Histogram:
    """Observations counted into fixed buckets: ``counts[i]`` holds values in ``(bounds[i-1],
    bounds[i]]`` and the last count those above every bound (Prometheus's ``le`` convention)."""

    __slots__ = ("bounds", "counts", "sum", "_edges")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self._edges = np.asarray(bounds, np.float64)
        self.counts = np.zeros(len(bounds) + 1, np.int64)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_many(self, values: np.ndarray) -> None:
        if len(values) == 1:
            self.observe(float(values[0]))
            return
        self.counts += np.bincount(np.searchsorted(self._edges, values), minlength=len(self.counts))
        self.sum += float(values.sum())

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count of values <= le)`` pairs ending with ``+Inf``, as a scrape reports them."""
        totals = np.cumsum(self.counts).tolist()  # one read of the counts, however they change meanwhile
        labels = [repr(float(b)) for b in self.bounds] + ["+Inf"]
        return list(zip(labels, totals))


class SchedulerStats:
    """What one model version's scheduler did: runs, rows, tokens and how long things took."""

    __slots__ = (
        "runs",
        "rows",
        "positions",
        "failures",
        "split_runs",
        "direct_runs",
        "stepped",
        "prefilled",
        "generated",
        "batch_rows",
        "run_seconds",
        "queue_wait",
        "step_latency",
    )

    def __init__(self) -> None:
        self.runs = self.rows = self.positions = self.failures = 0
        self.direct_runs = 0  # steps of a session stepping alone, run at once without queueing
        self.split_runs = 0  # multi-row runs that failed and were retried row by row
        self.stepped = 0  # positions fed by Step/StepStream steps
        self.prefilled = 0  # positions of generation prompts
        self.generated = 0  # tokens sampled by generations
        self.batch_rows = Histogram(ROWS_BOUNDS)  # rows per model run
        self.run_seconds = Histogram(LATENCY_BOUNDS)  # one model run
        self.queue_wait = Histogram(LATENCY_BOUNDS)  # accepted -> its model run starts
        self.step_latency = Histogram(LATENCY_BOUNDS)  # accepted -> answered

    def count_run(self, rows: int, positions: int, seconds: float) -> None:
        self.runs += 1
        self.rows += rows
        self.positions += rows * positions
        self.batch_rows.observe(rows)
        self.run_seconds.observe(seconds)

"""Counters a scheduler keeps about its model runs (read by tests, the benchmark and, later, metrics)."""

from __future__ import annotations


class SchedulerStats:
    """Counters updated once per model run (never per step)."""

    __slots__ = ("runs", "rows", "positions", "failures", "split_runs", "direct_runs", "batch_sizes")

    def __init__(self):
        self.runs = self.rows = self.positions = self.failures = 0
        self.direct_runs = 0  # steps of a session stepping alone, run at once without queueing
        self.split_runs = 0  # multi-row runs that failed and were retried row by row
        self.batch_sizes = [0] * 16  # runs by batch size bucket: 1, 2-3, 4-7, ... (log2)

    def count_run(self, rows: int, positions: int) -> None:
        self.runs += 1
        self.rows += rows
        self.positions += rows * positions
        self.batch_sizes[min(rows.bit_length() - 1, 15)] += 1

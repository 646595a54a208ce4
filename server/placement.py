"""Where a model version's runs go, and how large they get, by device and settings.

One decision, taken once per scheduler: step runs on the event loop or on the model thread,
which generation lanes hand their runs to that thread, whether cohort state moves go there too,
where long items' pieces run, and the most rows per run. The figures behind each choice are in docs/bench.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .runtime import Runtime

# The figures behind each value are in docs/bench.md, "Settings chosen by measurement".
# With at least this many generations in a scheduler's lanes, the lanes run them on the model
# thread (see lanes.py); fewer run on the event loop, in one lane, where a small run costs less
# than the hand-off to a thread and back. Kept low because inline runs slow the loop's acceptance
# of new calls, which can keep cohorts small (docs/bench.md).
OFFLOAD_ROWS = 8
# How long a cohort running on the event loop may keep feeding tokens before the loop takes its
# turn (reading, writing, other sessions' ticks): what it can add to their latency. A turn costs a
# sizeable part of a 1-row run, so a lone generation taking one per token runs well below the raw
# loop; a few tokens per turn amortise it (docs/bench.md, "One generating session").
LANE_BURST_S = 0.0005
# max_batch when the setting is 0. On a CPU a run's time grows with its rows, and 256 rows bound
# one tick's latency; on a GPU a run has a large fixed cost, so fewer, larger runs win.
CPU_MAX_BATCH = 256
GPU_MAX_BATCH = 1024
# max_run_rows when the setting is 0. A tick of 256 sessions' steps on a CPU runs as two runs of
# 128 with the first run's answers sent in between: clients then prepare half of their next steps
# while the second half computes, instead of everybody waiting for everybody (a gateway's 256
# sessions through one packed stream went from 0.58x to 0.83x the raw loop's 256 rows; a run of
# 128 rows costs about half of one of 256 on a CPU). On a GPU one large run is what is cheap.
CPU_RUN_ROWS = 128


@dataclass(frozen=True)
class Placement:
    max_batch: int  # most rows one run advances
    # step runs (and the cohorts' state moves with them) on the model thread, not the event loop:
    # on a GPU always, so the loop keeps serving while the device computes and never waits on the
    # store's lock; on a CPU only when asked (run_in_thread): with few cores the hand-off costs more
    runs_in_thread: bool
    lane_offload_rows: int  # with this many generations in all, the lanes hand their runs to the model thread
    run_rows: int  # most rows of one step run; a tick with more splits them (generation lanes use max_batch)
    lane_burst_s: float  # a lane running on the event loop feeds tokens this long per turn of the loop
    # long items' pieces run on a thread of their own, this much lower in OS priority (nice) than the
    # process, so that on busy cores the other sessions' steps come first; None: on the model thread
    # (a GPU's runs take turns on it, and they need little of the CPU)
    piece_nice: int | None


def placement_for(runtime: Runtime, config: Any) -> Placement:
    """The placement for ``runtime`` under ``config``."""
    on_gpu = runtime.device == "cuda"
    max_batch = config.max_batch or (GPU_MAX_BATCH if on_gpu else CPU_MAX_BATCH)
    return Placement(
        max_batch=max_batch,
        runs_in_thread=config.run_in_thread or on_gpu,
        lane_offload_rows=0 if on_gpu else OFFLOAD_ROWS,
        lane_burst_s=0.0 if on_gpu else LANE_BURST_S,
        run_rows=min(config.max_run_rows or (max_batch if on_gpu else CPU_RUN_ROWS), max_batch),
        piece_nice=None if on_gpu else config.prefill_nice,
    )

"""Where a model version's runs go, and how large they get, by device and settings.

One decision, taken once per scheduler: step runs on the event loop or on the model thread,
which generation lanes hand their runs to that thread, whether cohort state moves go there too,
and the most rows per run. The figures behind each choice are in docs/bench.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .runtime import Runtime

# The figures behind each value are in docs/bench.md, "Settings chosen by measurement".
# A lane with at least this many rows runs them on the model thread (see lanes.py); fewer run on
# the event loop, where a tiny run costs less than the hand-off to a thread and back. Kept low
# because inline runs slow the loop's acceptance of new calls, which can keep cohorts small.
OFFLOAD_ROWS = 4
# max_batch when the setting is 0. On a CPU a run's time grows with its rows, and 256 rows bound
# one tick's latency; on a GPU a run has a large fixed cost, so fewer, larger runs win.
CPU_MAX_BATCH = 256
GPU_MAX_BATCH = 1024


@dataclass(frozen=True)
class Placement:
    max_batch: int  # most rows one run advances
    # step runs (and the cohorts' state moves with them) on the model thread, not the event loop:
    # on a GPU always, so the loop keeps serving while the device computes and never waits on the
    # store's lock; on a CPU only when asked (run_in_thread): with few cores the hand-off costs more
    runs_in_thread: bool
    lane_offload_rows: int  # a generation lane with this many rows hands its runs to the model thread


def placement_for(runtime: Runtime, config: Any) -> Placement:
    """The placement for ``runtime`` under ``config``."""
    on_gpu = runtime.device == "cuda"
    return Placement(
        max_batch=config.max_batch or (GPU_MAX_BATCH if on_gpu else CPU_MAX_BATCH),
        runs_in_thread=config.run_in_thread or on_gpu,
        lane_offload_rows=0 if on_gpu else OFFLOAD_ROWS,
    )

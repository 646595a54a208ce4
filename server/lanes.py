"""Generation lanes: each one drives a cohort of generations through model runs on its own.

A scheduler has ``LANES`` lanes. A lane loops: admit the generations that joined it, drop the
cancelled ones, feed its rows (one run per ``max_batch`` rows), draw their next tokens and hand
finished messages to the Generate calls. Joining and leaving happen only at the top of a round,
so a cohort's dense state is never touched while one of its runs is in flight.

Why two lanes, and why a thread: with many generations, lanes hand their runs to the scheduler's
model thread (ONNX Runtime computes without holding the GIL), and while it computes, the event
loop writes the other lane's messages, accepts new calls and prepares that lane's next run, which
is then already queued when the thread comes free. With one lane the thread would sit idle every
round while the loop caught up, and the loop idle while the thread ran. While the lanes hold fewer
than ``offload_rows`` generations in all, they run on the event loop instead: a small run is
cheaper than the hand-off to a thread, and a lane there feeds several tokens per turn of the loop
(``burst_s``), as a turn per token would cost more than the run's own Python; greedy rows without
stop sequences take those runs back to back, the cohort recording their tokens after the last
(``_run_greedy``).

Which lane a generation joins (``lane_to_join``): on the event loop a run of a few rows costs
barely more than a run of one, so a few generations share one lane's runs rather than take turns
in two; new generations join the fuller lane then. With enough generations for the model thread,
they join the emptier one, so both lanes keep it busy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from typing import Any, Protocol

import numpy as np

from .errors import run_failed
from .generation import Cohort
from .placement import Placement
from .stats import SchedulerStats

log = logging.getLogger("seqserve.server")
LANES = 2


class LaneOwner(Protocol):
    """What a lane tells its scheduler."""

    stats: SchedulerStats  # where the lane counts its runs and generated tokens

    @property
    def generation_rows(self) -> int:
        """Rows in all the scheduler's lanes (joining ones included)."""

    def generations_left(self, sessions: list) -> None:
        """These sessions' generations ended: they take queued steps again."""


def lane_to_join(lanes: list[GenerationLane], joining: int) -> GenerationLane:
    """The lane ``joining`` new generations join: the fuller while all the lanes' rows, these
    included, are too few for the model thread, else the emptier."""
    if sum(len(lane) for lane in lanes) + joining < lanes[0].offload_rows:
        return max(lanes, key=len)
    return min(lanes, key=len)


class GenerationLane:
    """One cohort and the coroutine that advances it."""

    def __init__(
        self, name: str, runtime: Any, owner: LaneOwner, place: Placement, flush_s: float, pool: Executor | None
    ):
        self.name = name
        self.runtime = runtime
        self.owner = owner
        self.stats = owner.stats
        self.cohort = Cohort(runtime, flush_s, self.stats)
        self.max_batch = place.max_batch
        self.pool = pool  # the scheduler's model thread (None: always run on the event loop)
        self.offload_rows = place.lane_offload_rows
        self.burst_s = place.lane_burst_s
        # Moving the cohort's state to and from the store (when members join or leave) goes to the
        # model thread too when step runs do: on a GPU those moves are device runs that wait for the
        # store's lock, which a step run may hold, and on the event loop they stalled it
        # (docs/bench.md, "GPU").
        self.state_in_thread = place.runs_in_thread and pool is not None
        self.joining: list[tuple[list, np.ndarray]] = []  # (generations, logits to draw their first token from)
        self.thread_runs = 0  # runs handed to the model thread
        self._wake: asyncio.Future | None = None
        self._task: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self.cohort) + sum(len(gens) for gens, _ in self.joining)

    @property
    def idle(self) -> bool:
        return not self.joining and not len(self.cohort) and not self.cohort.cancelled

    # -- from the scheduler ----------------------------------------------------------------------
    def join(self, gens: list, rows: np.ndarray) -> None:
        """Generations whose prompt is fed join at the lane's next round."""
        for g in gens:
            g.joined = True
            g.lane = self
        self.joining.append((gens, rows))
        self._poke()

    def cancel(self, g) -> None:
        self.cohort.cancelled.append(g)
        self._poke()

    def _poke(self) -> None:
        w = self._wake
        if w is not None:
            self._wake = None
            w.set_result(None)

    # -- the lane's loop -------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"generation {self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self.idle:
                self._wake = loop.create_future()
                await self._wake
            try:
                offloaded = await self._round(loop)
            except Exception:  # a bug here must not stop generation for good: log it, keep going
                log.exception("lane %s: generation round failed", self.name)
                offloaded = False
            if not offloaded:
                await asyncio.sleep(0)  # the run held the loop: let the transport write and read

    async def _round(self, loop) -> bool:
        c = self.cohort
        if c.state is not None and (self.joining or c.cancelled):
            await self._move_state(loop, c.sync)  # before membership changes
        now = time.perf_counter()
        while self.joining:
            gens, rows = self.joining.pop(0)
            c.admit(gens, rows, now)
        self.owner.generations_left(c.drop_cancelled())
        if not len(c):
            return False
        offload = self.pool is not None and self.owner.generation_rows >= self.offload_rows
        if c.state is None:
            await self._move_state(loop, c.prepare, self.max_batch)
        finished: list = []
        # A small cohort runs on the event loop, where a turn of the loop (select, callbacks, this
        # round's checks) per token would cost a sizeable part of each 1-row run: it feeds tokens
        # back to back for up to burst_s per turn, until a row finishes or fails or time is up.
        deadline = time.perf_counter() + self.burst_s
        while True:
            for k, (lo, hi) in enumerate(c.chunks):
                span = 0 if offload else c.greedy_span(lo, hi)
                if span > 1:
                    self._run_greedy(k, lo, hi, span, deadline)
                else:
                    await self._run(loop, k, lo, hi, offload, finished)
            if offload or finished or c.cancelled or time.perf_counter() >= deadline:
                break
        if finished:  # the state goes back to the slabs before the sessions go back to the scheduler
            await self._move_state(loop, c.sync)
            self.owner.generations_left(c.finish(finished, time.perf_counter()))
        return offload

    async def _move_state(self, loop, move, *args) -> None:
        """Move the cohort's state to or from the slabs: on the model thread when runs go there."""
        if self.state_in_thread:
            await loop.run_in_executor(self.pool, move, *args)
        else:
            move(*args)

    async def _run(self, loop, k: int, lo: int, hi: int, offload: bool, finished: list) -> None:
        c = self.cohort
        x = c.x[lo:hi].reshape(-1, 1)
        started = time.perf_counter()
        try:
            if offload:
                self.thread_runs += 1
                logits, state = await loop.run_in_executor(self.pool, self.runtime.run_dense, x, c.state[k])
            else:
                logits, state = self.runtime.run_dense(x, c.state[k])
        except Exception as exc:
            self._failed(exc, lo, hi)
            return
        c.state[k] = state
        now = time.perf_counter()
        self.stats.count_run(hi - lo, 1, now - started)
        finished.extend(c.fed(lo, hi, logits[:, 0, :], now))

    def _run_greedy(self, k: int, lo: int, hi: int, span: int, deadline: float) -> None:
        """Runs of rows lo..hi (greedy, on the event loop) back to back, each fed the argmaxes of
        the one before, up to ``span`` runs (Cohort.greedy_span) or the deadline. Per token this
        is the run and the argmax; the cohort records the tokens once, after the last run."""
        c = self.cohort
        x = c.x[lo:hi].reshape(-1, 1)  # a view: each run's argmaxes go straight into the cohort's inputs
        run, count_run, clock = self.runtime.run_dense, self.stats.count_run, time.perf_counter
        drawn: list[np.ndarray] = []
        logits = None
        try:
            while len(drawn) < span:
                started = clock()
                logits, c.state[k] = run(x, c.state[k])
                ran = clock()
                count_run(hi - lo, 1, ran - started)
                tokens = logits[:, 0, :].argmax(axis=1)
                x[:, 0] = tokens
                drawn.append(tokens)
                if ran >= deadline:
                    break
        except Exception as exc:
            self._failed(exc, lo, hi)
        if logits is not None:  # the state holds these runs even when a later one failed, and a
            # run's logits outlast the run after it (Runtime.run_dense)
            c.drew_greedy(lo, hi, drawn, logits[:, 0, :], clock())

    def _failed(self, exc: Exception, lo: int, hi: int) -> None:
        """A run of rows lo..hi failed: they keep their state; their generations end with INTERNAL."""
        err = run_failed(f"model run failed during generation ({type(exc).__name__})")
        log.error("lane %s: generation run failed: %s", self.name, exc)
        for g in self.cohort.items[lo:hi]:
            g.sink.fail(err)
            self.cohort.cancelled.append(g)

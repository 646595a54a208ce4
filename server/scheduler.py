"""Continuous batching: one scheduler per model version gathers pending steps into model runs.

Each session queues its work in order; a session with work waits in the ``ready`` queue, oldest
first. A tick takes up to ``max_batch`` ready sessions, runs the head item of each (at most one
step per session per tick, so state is applied in order), and puts sessions with more work back
at the end of the queue, so nobody starves. Items of equal length share one run; a multi-token
chunk is one run of its full length, never split per token (ORT's LSTM/GRU do the input GEMM for
all positions at once, and padding would corrupt the recurrent state). A group of more than
``run_rows`` items runs as several equal runs, the answers of each sent before the next (clients
overlap the server). Items longer than ``max_prefill_chunk`` run piece by piece off the event loop
(chunks.py; on a CPU on a thread of lower OS priority) while the ticks go on.

Generations whose prompt is fed join one of the scheduler's generation lanes (lanes.py), which
feed their cohorts in runs of up to ``max_batch`` rows and sample the next tokens of all rows at
once, with no asyncio round trip per token, independently of the step ticks here.

With batching off, naive.NaiveScheduler replaces this loop (the one-run-per-request baseline).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .affinity import Lowered, Unpinned
from .chunks import Piece, complete_pieces, next_piece, restore
from .completion import RunCompletion
from .inputs import RunInputs
from .lanes import LANES, GenerationLane, lane_to_join
from .placement import placement_for
from .runtime import Runtime
from .stats import SchedulerStats
from .work import GenItem, StepItem

log = logging.getLogger("seqserve.server")


class Scheduler:
    """Owns the ready queue, the step loop and the generation lanes of one model version."""

    def __init__(self, model: Any, runtime: Runtime, config: Any):
        self.model = model
        self.runtime = runtime
        self.store = runtime.store
        place = placement_for(runtime, config)
        self.max_batch = place.max_batch
        self.run_rows = place.run_rows  # a larger group of a tick runs in several runs (see _tick)
        self.max_wait = config.max_wait_ms / 1000.0
        self.offload = place.runs_in_thread  # step runs on the model thread too
        self.head_top_k = runtime.top_k_in_run  # lone steps' top-k from the run
        self.inputs = RunInputs(model.tokens)
        self.chunk = config.max_prefill_chunk  # longer items run in pieces (chunks.py); 0: never
        self.ready: deque = deque()
        self.stats = SchedulerStats()
        self.completion = RunCompletion(model.key, model.width, self.stats)
        self.running = False  # a tick is in progress
        self._last_session: Any = None  # the session the previous tick (or direct run) advanced, if only one
        self._wake: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self._pieces: set[asyncio.Task] = set()  # runs of long items' pieces, off the event loop
        # the model thread: generation lanes' large runs, and step runs when offloaded
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"run-{model.key}", initializer=Unpinned())
        # long items' pieces: on a CPU a thread of their own, at a lower OS priority (placement.py)
        self._piece_pool = self._pool
        if place.piece_nice is not None:
            lowered = Lowered(place.piece_nice)
            self._piece_pool = ThreadPoolExecutor(1, thread_name_prefix=f"pieces-{model.key}", initializer=lowered)
        flush_s = config.generate_flush_ms / 1000.0
        self.lanes = [
            GenerationLane(f"{model.key}/{i}", runtime, self, place, flush_s, self._pool) for i in range(LANES)
        ]

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"scheduler {self.model.key}")
        for lane in self.lanes:
            lane.start()

    async def stop(self) -> None:
        for lane in self.lanes:
            await lane.stop()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for task in list(self._pieces):
            task.cancel()
        await asyncio.gather(*self._pieces, return_exceptions=True)
        self._pool.shutdown(wait=True)
        self._piece_pool.shutdown(wait=True)

    @property
    def idle(self) -> bool:
        return not self.ready and not self.running and not self._pieces and all(lane.idle for lane in self.lanes)

    # -- queueing ------------------------------------------------------------------------------
    def enqueue(self, s, item, direct: bool = True) -> None:
        """Make sure queued work on a session (already validated and queued) will run; ``direct``
        False: not at once, even when it could (more steps are being queued to run with it)."""
        if s.in_ready or (s.generating is not None and s.generating.joined):
            return  # already queued, or its generation will hand it back when done
        if (
            type(item) is StepItem
            and direct
            and (item.n <= self.chunk or not self.chunk)
            and s is self._last_session
            and not self.ready
            and not self.running
            and not self.offload
            and len(s.pending) == 1
        ):
            self._run_now(s, item)
            return
        s.enter_ready()
        self.ready.append(s)
        self._poke()

    def _run_now(self, s, item: StepItem) -> None:
        """A session stepping alone (nobody else queued, and it was alone last time too) runs at
        once, in the caller's coroutine: what a tick of one would do, without the hop to the
        scheduler's task and back (the single-session latency path)."""
        s.begin_run()
        self.running = True
        self.stats.direct_runs += 1
        try:
            x, slots = self.inputs.lone(item)
            plan = item.plan
            k = plan.top_k if self.head_top_k and not plan.all_positions else 0  # plans keep k <= width
            started = time.perf_counter()
            try:
                if k:  # the answer's top-k comes out of the same run
                    logits, ids, logprobs = self.runtime.run_top_k(x, slots, k)
                    top = (ids, logprobs)
                else:
                    logits, top = self.runtime.run(x, slots), None
            except Exception as exc:
                self.completion.fail(item, exc)
            else:
                self.completion.complete([item], logits, started, top)
        finally:
            self.running = False
            self._requeue([s])
            if self.ready:
                self._poke()

    def _poke(self) -> None:
        w = self._wake
        if w is not None:
            self._wake = None
            w.set_result(None)

    def cancel(self, g: GenItem) -> None:
        """The Generate call went away, or its session ended: stop the generation at the next tick."""
        if not g.cancelled:
            g.cancelled = True
            if g.joined:
                g.lane.cancel(g)

    # -- the batched loop ------------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.ready:
                self._wake = loop.create_future()
                await self._wake
            waiting = len(self.ready)
            # the same session stepping alone again runs at once (latency); otherwise let more join
            # (several sessions pipelined on one stream arrive one read at a time)
            alone_again = waiting == 1 and self.ready[0] is self._last_session
            if self.max_wait and waiting < self.max_batch and not alone_again:
                await self._collect()
            self.running = True
            try:
                await self._tick(loop)
            except Exception:  # a bug here must not stop serving: log it, keep the loop alive
                log.exception("scheduler %s: tick failed", self.model.key)
            finally:
                self.running = False
            if self.ready:
                await asyncio.sleep(0)  # let the transport write results and read new steps

    async def _collect(self) -> None:
        """Let requests already in flight join the batch: yield while the queue keeps growing,
        at most ``max_wait``."""
        deadline = time.perf_counter() + self.max_wait
        n = len(self.ready)
        while n < self.max_batch:
            await asyncio.sleep(0)
            m = len(self.ready)
            if m == n or time.perf_counter() >= deadline:
                return
            n = m

    def _take(self, limit: int) -> list:
        """Up to ``limit`` ready sessions with a runnable head item (queued refusals answered)."""
        ready = self.ready
        batch: list = []
        while ready and len(batch) < limit:
            s = ready.popleft()
            s.leave_ready()
            if s.busy:  # a piece of its long item is running: back when it ends
                continue
            s.deliver_refusals()
            pending = s.pending
            if pending and not (type(pending[0]) is GenItem and pending[0].joined):
                batch.append(s)
        return batch

    def _requeue(self, sessions: list) -> None:
        for s in sessions:
            if s.end_run():
                s.enter_ready()
                self.ready.append(s)

    async def _tick(self, loop) -> None:
        batch = self._take(self.max_batch)
        self._last_session = batch[0] if len(batch) == 1 else None
        heads = [s.pending[0] for s in batch]
        held: list = []  # sessions whose run goes on after the tick (pieces, off the event loop)
        try:
            groups, pieced = self._plan(batch)
            for n, items in groups.items():
                if n in pieced:
                    continue
                if len(items) > self.run_rows:
                    await self._run_split(loop, n, items)
                else:
                    await self._run_items(loop, n, items)
            for n in pieced:  # long items' pieces compute off the event loop while ticks go on
                items = groups[n]
                held += [it.session for it in items]
                task = loop.create_task(self._run_pieces(loop, n, items))
                self._pieces.add(task)
                task.add_done_callback(self._pieces.discard)
        except Exception as exc:
            for s, head in zip(batch, heads):  # fail what this tick was running rather than hang
                if s.pending and s.pending[0] is head and not s.ended and s not in held:
                    self._fail(head, exc)
            raise
        finally:
            self._requeue([s for s in batch if s not in held] if held else batch)

    async def _run_pieces(self, loop, n: int, items: list) -> None:
        """A run holding pieces of long items, off the event loop: the loop keeps reading,
        writing and running other sessions' ticks meanwhile (a piece of a long prompt on the loop
        would hold all of them up for its whole run). Its sessions go back to the queue after it."""
        try:
            await self._run_items(loop, n, items, True)
        except Exception as exc:  # a bug here must not leave its sessions stuck
            log.exception("scheduler %s: run of pieces failed", self.model.key)
            for it in items:
                target = it.item if type(it) is Piece else it
                s = it.session
                if s.pending and s.pending[0] is target and not s.ended:
                    self._fail(it, exc)
        finally:
            self._requeue([it.session for it in items])
            if self.ready:
                self._poke()

    def _plan(self, batch: list) -> tuple[dict[int, list], list[int]]:
        """Group the batch's head items by input length; generations without a prompt join the
        cohort right away (their first token comes from the last step's logits). Items longer
        than the chunk are represented by their next piece; the lengths of the groups holding
        pieces come second."""
        groups: dict[int, list] = {}
        pieced: list[int] = []
        fresh = None
        chunk = self.chunk
        for s in batch:
            s.begin_run()
            item = s.pending[0]
            if type(item) is GenItem:
                if item.cancelled:
                    restore(item, self.store)
                    s.end_generation(item)
                    continue
                if item.n == 0:
                    fresh = fresh or []
                    fresh.append(item)
                    continue
            if chunk and item.n > chunk:
                piece = next_piece(item, chunk, self.store, self.inputs.tokens)
                if piece is not None:
                    item = piece
                    if piece.n not in pieced:
                        pieced.append(piece.n)
            group = groups.get(item.n)
            if group is None:
                groups[item.n] = [item]
            else:
                group.append(item)
        if fresh:
            slots = np.fromiter((g.session.slot for g in fresh), np.intp, len(fresh))
            self._admit(fresh, self.store.last_logits(slots))
        return groups, pieced

    def _admit(self, gens: list, rows: np.ndarray) -> None:
        """Prompts fed: the generations join a lane (``rows``: their last logits)."""
        lane_to_join(self.lanes, len(gens)).join(gens, rows)

    # -- what lanes tell the scheduler (lanes.LaneOwner) ----------------------------------------------
    def generations_left(self, sessions: list) -> None:
        if sessions:
            self._requeue(sessions)
            if self.ready:
                self._poke()

    # -- what metrics read ---------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Sessions with work waiting for a model run."""
        return len(self.ready)

    @property
    def generation_rows(self) -> int:
        """Generations being decoded in the lanes."""
        return sum(len(lane) for lane in self.lanes)

    async def _call(self, loop, x: np.ndarray, slots: np.ndarray, pieced: bool = False) -> np.ndarray:
        if pieced:
            return await loop.run_in_executor(self._piece_pool, self.runtime.run, x, slots)
        if self.offload:
            return await loop.run_in_executor(self._pool, self.runtime.run, x, slots)
        return self.runtime.run(x, slots)

    async def _run_items(self, loop, n: int, items: list, pieced: bool = False) -> None:
        x, slots = self.inputs.batch(n, items)
        started = time.perf_counter()
        try:
            logits = await self._call(loop, x, slots, pieced)
        except Exception as exc:
            if len(items) == 1:
                self._fail(items[0], exc)
                return
            self.stats.split_runs += 1
            for item in items:  # isolate: only the items that fail on their own get an error
                await self._run_items(loop, n, [item], pieced)
            return
        if pieced:
            joining = complete_pieces(items, logits, started, self.completion)
        else:
            joining = self.completion.complete(items, logits, started)
        if joining is not None:  # prompts fed: the generations join a lane
            self._admit(*joining)

    async def _run_split(self, loop, n: int, items: list) -> None:
        """A group larger than ``run_rows``: equal runs, each one's answers sent before the next
        starts (the yield lets the stream writers run), so the clients' work on their next steps
        overlaps the server's on the rest."""
        runs = -(-len(items) // self.run_rows)
        size = -(-len(items) // runs)
        for i in range(0, len(items), size):
            if i:
                await asyncio.sleep(0)
            await self._run_items(loop, n, items[i : i + size])

    def _fail(self, item, exc: Exception) -> None:
        """A run failed for ``item`` (a work item or a piece of one) alone."""
        if type(item) is Piece:
            item = item.item
            pending = item.session.pending
            if not pending or pending[0] is not item:  # its session ended meanwhile: refused already
                return
        restore(item, self.store)  # pieces that ran are undone: the item did not run at all
        self.completion.fail(item, exc)

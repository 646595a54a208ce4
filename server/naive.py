"""Batching off: every step runs alone as it arrives (the naive one-run-per-request baseline).

Steps run inline, inside the call that submitted them; a generation is a loop of batch-1 runs
(one per token) on its own task. Validation, answers and generation bookkeeping are shared with
the batched scheduler (completion.py, generation.py), so the two modes differ only in how runs
are formed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np

from .completion import RunCompletion
from .errors import run_failed
from .generation import Cohort
from .inputs import RunInputs
from .runtime import Runtime
from .stats import SchedulerStats
from .work import ErrorItem, GenItem

log = logging.getLogger("seqserve.server")


class NaiveScheduler:
    """One model run per request, no batching, no scheduler task (same interface as Scheduler)."""

    def __init__(self, model: Any, runtime: Runtime, config: Any):
        self.model = model
        self.runtime = runtime
        self.store = runtime.store
        self.flush_s = config.generate_flush_ms / 1000.0
        self.inputs = RunInputs(model.tokens)
        self.stats = SchedulerStats()
        self.completion = RunCompletion(model.key, model.width, self.stats)
        self.generating = 0  # generation tasks running
        self._tasks: set[asyncio.Task] = set()

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    @property
    def idle(self) -> bool:
        return not self.generating

    @property
    def queue_depth(self) -> int:
        return 0  # steps run inline as they arrive: nothing waits

    @property
    def generation_rows(self) -> int:
        return self.generating

    def cancel(self, g: GenItem) -> None:
        g.cancelled = True  # the generation's own loop notices before its next run

    def enqueue(self, s, item, direct: bool = True) -> None:  # every step runs at once here
        if s.in_ready:
            return  # a generation's task is running this session's queue
        s.enter_ready()
        while s.pending and type(s.pending[0]) is not GenItem:
            self._step(s)
        if s.pending:
            task = asyncio.get_running_loop().create_task(self._drive(s))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            s.leave_ready()

    async def _drive(self, s) -> None:
        self.generating += 1
        try:
            while s.pending and not s.ended:
                if type(s.pending[0]) is GenItem:
                    await self._generate(s.pending[0])
                else:
                    self._step(s)
        finally:
            self.generating -= 1
            s.leave_ready()
            s.end_run()  # frees the slot of a session closed while generating

    def _step(self, s) -> None:
        head = s.pending[0]
        if type(head) is ErrorItem:
            s.deliver_refusals()
            return
        x, slots = self.inputs.batch(head.n, [head])
        s.begin_run()
        started = time.perf_counter()
        try:
            logits = self.runtime.run(x, slots)
        except Exception as exc:
            self.completion.fail(head, exc)
        else:
            self.completion.complete([head], logits, started)
        finally:
            s.end_run()

    async def _generate(self, g: GenItem) -> None:
        """One generation, one batch-1 run per token."""
        s, now = g.session, time.perf_counter
        if g.cancelled:
            s.end_generation(g)
            return
        stats = self.stats
        cohort = Cohort(self.runtime, self.flush_s, stats)
        try:
            if g.n:
                x, slots = self.inputs.batch(g.n, [g])
                started = now()
                rows = self.runtime.run(x, slots)[:, -1, :]
                stats.count_run(1, g.n, now() - started)
                stats.queue_wait.observe(started - g.arrived)
                stats.prefilled += g.n
                s.applied(g.n)
            else:
                rows = self.store.last_logits(np.array([s.slot]))
            g.joined = True
            cohort.admit([g], rows, now())
            while True:
                await asyncio.sleep(0)
                if g.cancelled:
                    cohort.cancelled.append(g)
                    cohort.drop_cancelled()
                    return
                cohort.prepare(1)
                started = now()
                logits, cohort.state[0] = self.runtime.run_dense(cohort.x.reshape(1, 1), cohort.state[0])
                ran = now()
                stats.count_run(1, 1, ran - started)
                done = cohort.fed(0, 1, logits[:, 0, :], ran)
                if done:
                    cohort.finish(done, now())
                    return
        except Exception as exc:
            log.error("model %s: generation failed for session %s: %s", self.model.key, s.id, exc)
            g.sink.fail(run_failed(f"model run failed during generation ({type(exc).__name__})"))
            if g.joined:
                cohort.cancelled.append(g)
                cohort.drop_cancelled()
            else:
                s.end_generation(g)

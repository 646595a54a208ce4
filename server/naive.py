"""Batching off: every step runs alone as it arrives (the naive one-run-per-request baseline).

Steps run inline, inside the call that submitted them; a generation is a loop of batch-1 runs
(one per token) on its own task. Validation, outputs and generation bookkeeping are the batched
scheduler's, so the two modes differ only in how runs are formed.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from .errors import internal
from .generation import Cohort
from .scheduler import Scheduler
from .work import ErrorItem, GenItem

log = logging.getLogger("seqserve.server")


class NaiveScheduler(Scheduler):
    """One model run per request, no batching, no scheduler task."""

    def __init__(self, model, config):
        super().__init__(model, config)
        self.max_batch = 1
        self.generating = 0  # generation tasks running

    def start(self) -> None:
        pass

    @property
    def idle(self) -> bool:
        return not self.generating

    def cancel(self, g: GenItem) -> None:
        g.cancelled = True  # the generation's own loop notices before its next run

    def enqueue(self, s, item) -> None:
        s.pending.append(item)
        if s.in_ready:
            return  # a generation's task is running this session's queue
        s.in_ready = True
        while s.pending and type(s.pending[0]) is not GenItem:
            self._step(s)
        if s.pending:
            asyncio.get_running_loop().create_task(self._drive(s))
        else:
            s.in_ready = False

    async def _drive(self, s) -> None:
        self.generating += 1
        try:
            while s.pending:
                if type(s.pending[0]) is GenItem:
                    await self._generate(s.pending[0])
                    if s.ended:  # closed while generating: its slot may have been left to us
                        s.release_slot()
                        s.pending.clear()
                        return
                else:
                    self._step(s)
        finally:
            self.generating -= 1
            s.in_ready = False

    def _step(self, s) -> None:
        head = s.pending[0]
        if type(head) is ErrorItem:
            s.pending.popleft().deliver()
            return
        x, slots = self.inputs.batch(head.n, [head])
        try:
            logits = self.runtime.run(x, slots)
        except Exception as exc:
            self._fail(head, exc)
            return
        self._complete([head], logits)

    async def _generate(self, g: GenItem) -> None:
        """One generation, one batch-1 run per token."""
        s, now = g.session, time.perf_counter
        if g.cancelled:
            s.pending.popleft()
            s.generating = None
            return
        cohort = Cohort(self.runtime, self.flush_s)
        try:
            if g.n:
                x, slots = self.inputs.batch(g.n, [g])
                rows = self.runtime.run(x, slots)[:, -1, :]
                s.position += g.n
            else:
                rows = self.store.last_rows(np.array([s.slot]))
            g.joined = True
            cohort.admit([g], rows, now())
            while True:
                await asyncio.sleep(0)
                if g.cancelled:
                    cohort.cancelled.append(g)
                    cohort.drop_cancelled()
                    return
                cohort.prepare(1)
                logits, cohort.state[0] = self.runtime.run_dense(cohort.x.reshape(1, 1), cohort.state[0])
                done = cohort.fed(0, 1, logits[:, 0, :], now())
                if done:
                    cohort.finish(done, now())
                    return
        except Exception as exc:
            log.error("model %s: generation failed for session %s: %s", self.model.key, s.id, exc)
            g.sink.fail(internal(f"model run failed during generation ({type(exc).__name__})"))
            if g.joined:
                cohort.cancelled.append(g)
                cohort.drop_cancelled()
            else:
                s.pending.popleft()
                s.generating, s.queued = None, s.position

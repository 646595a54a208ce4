"""What happens when a model run is over: positions advance and answers go out, or the run failed.

Shared by the batched scheduler and the naive one, so the two modes differ only in how runs are
formed. A run's items are the head items of their sessions; every change to a session goes
through its transitions (session.py).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from .domain import StepAnswers
from .errors import run_failed
from .outputs import render_all, render_last
from .stats import SchedulerStats
from .work import GenItem, StepItem

log = logging.getLogger("seqserve.server")


class RunCompletion:
    """Delivers one model version's run results (``complete``) and failures (``fail``)."""

    def __init__(self, model_key: str, width: int, stats: SchedulerStats):
        self.model_key = model_key
        self.width = width
        self.stats = stats
        self.rng = np.random.default_rng()  # draws of unseeded sampled steps

    def complete(
        self, items: list, logits: np.ndarray, started: float, top: tuple | None = None
    ) -> tuple[list, np.ndarray] | None:
        """Deliver a run's results; the run began at ``started`` (``time.perf_counter``) and
        ``top`` (ids, log-probs) came with the run of a lone step. Returns the generations whose
        prompt this run fed, with their last logits, to join a cohort (None if there are none)."""
        stats = self.stats
        ran = time.perf_counter()
        b = len(items)
        width = self.width
        stats.count_run(b, logits.shape[1], ran - started)
        steps: dict = {}
        gens: list[int] | None = None
        stepped = 0
        for row, item in enumerate(items):
            s = item.session
            s.applied(item.n)
            if type(item) is StepItem:
                stepped += item.n
                if item.plan.all_positions:
                    uniforms = self._uniforms([item], logits.shape[1])
                    s.answer(item, render_all(item.plan, logits[row], item, width, uniforms))
                    continue
                rows = steps.get(item.plan)
                if rows is None:
                    steps[item.plan] = [row]
                else:
                    rows.append(row)
            else:
                gens = gens or []
                gens.append(row)
        last = logits[:, -1, :]
        for plan, rows in steps.items():
            chosen = [items[r] for r in rows]
            uniforms = self._uniforms(chosen, 1) if plan.needs_rng else None
            block = last if len(rows) == b else last[rows]
            answers = render_last(plan, block, chosen, width, uniforms, top)
            for i, item in enumerate(chosen):
                item.session.answered(item, answers, i)
            deliver(chosen, answers)
            for item in chosen:
                if item.followers:
                    item.session.answer_resends(item)
        stats.stepped += stepped
        self._timed(items, started, gens)
        if gens is None:
            return None
        joining = []
        for r in gens:
            g = items[r]
            if g.cancelled:  # the call went away while its prompt ran
                g.session.end_generation(g)
            else:
                joining.append(r)
        return ([items[r] for r in joining], last[joining]) if joining else None

    def _timed(self, items: list, started: float, gens: list[int] | None) -> None:
        """Queue wait (accepted -> run start) of every item; latency (accepted -> answered) of the steps."""
        stats = self.stats
        answered = time.perf_counter()
        if len(items) == 1:
            arrived = items[0].arrived
            stats.queue_wait.observe(started - arrived)
            if gens is None:
                stats.step_latency.observe(answered - arrived)
            else:
                stats.prefilled += items[0].n
            return
        arrivals = np.fromiter((it.arrived for it in items), np.float64, len(items))
        stats.queue_wait.observe_many(started - arrivals)
        if gens is not None:
            stats.prefilled += sum(items[r].n for r in gens)
            arrivals = np.delete(arrivals, gens)
        if len(arrivals):
            stats.step_latency.observe_many(answered - arrivals)

    def _uniforms(self, items: list, per_item: int) -> np.ndarray | None:
        if not any(it.plan.needs_rng for it in items):
            return None
        draws = []
        for it in items:
            seed = it.plan.sample.seed
            rng = np.random.default_rng(seed) if seed is not None else self.rng
            draws.append(rng.random(per_item))
        return np.concatenate(draws)

    def fail(self, item: StepItem | GenItem, exc: Exception) -> None:
        """A run failed for this item alone: its state is unchanged; it is answered with RUN_FAILED."""
        self.stats.failures += 1
        s = item.session
        log.error("model %s: run failed for session %s: %s", self.model_key, s.id, exc)
        err = run_failed(
            f"model run failed ({type(exc).__name__}); the session's state is unchanged at position {s.position}",
            position=s.position,
        )
        if type(item) is GenItem:
            s.end_generation(item)
            item.sink.fail(err)
        else:
            s.step_failed(item, err)


def deliver(items: list, answers: StepAnswers) -> None:
    """Send each item's row of ``answers`` to its sink, a sink's rows together (in item order)."""
    first = items[0].sink
    if len(items) == 1 or all(it.sink is first for it in items):  # one stream (or one call) sent them all
        first.push_answers(answers, None)
        return
    rows: dict = {}
    for i, it in enumerate(items):
        sink_rows = rows.get(it.sink)
        if sink_rows is None:
            rows[it.sink] = [i]
        else:
            sink_rows.append(i)
    for sink, chosen in rows.items():
        sink.push_answers(answers, chosen)

"""What happens when a model run is over: positions advance and answers go out, or the run failed.

Shared by the batched scheduler and the naive one, so the two modes differ only in how runs are
formed. A run's items are the head items of their sessions; every change to a session goes
through its transitions (session.py).
"""

from __future__ import annotations

import logging

import numpy as np

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

    def count(self, rows: int, positions: int) -> None:
        self.stats.count_run(rows, positions)

    def complete(self, items: list, logits: np.ndarray, top: tuple | None = None) -> tuple[list, np.ndarray] | None:
        """Deliver a run's results; ``top`` (ids, log-probs) came with the run of a lone step.
        Returns the generations whose prompt this run fed, with their last logits, to join a
        cohort (None if there are none)."""
        b = len(items)
        width = self.width
        self.count(b, logits.shape[1])
        steps: dict = {}
        gens: list[int] | None = None
        for row, item in enumerate(items):
            s = item.session
            s.applied(item.n)
            if type(item) is StepItem:
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
            for item, result in zip(chosen, render_last(plan, block, chosen, width, uniforms, top)):
                item.session.answer(item, result)
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

"""Pieces every training loop shares: seeding, the step/epoch/time budget, the learning-rate schedule,
live progress on stderr, the history of a run and the best checkpoint."""

from __future__ import annotations

import copy
import math
import random
import statistics
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .config import TrainConfig


def setup_torch(config: TrainConfig) -> None:
    """Fix every seed and the starting thread count before a model is built."""
    torch.set_num_threads(config.resolved_threads())
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)


class ThreadChooser:
    """Picks the torch thread count by timing real training steps (``threads=0``, several cores).

    A trial runs ``trial_steps`` steps on every core, then as many on one, and keeps the faster
    setting. On an idle machine all cores win; on a busy shared one a single thread can be many
    times faster (measured: 170 ms against 2 s per step), because every small parallel region of
    a recurrent step waits for the slowest thread. If the machine gets busy later, all-core steps
    slow down: once the median of the last ``window`` steps is ``recheck_factor`` times the trial's,
    a new trial runs. Trial steps are ordinary training steps; nothing is wasted but speed.
    """

    def __init__(self, config: TrainConfig, trial_steps: int = 4, window: int = 8, recheck_factor: float = 2.0):
        self.cores = config.resolved_threads()
        self.auto = config.threads == 0 and self.cores > 1
        self.trial_steps = trial_steps
        self.recheck_factor = recheck_factor
        self.chosen: int | None = None if self.auto else self.cores
        self.trials = 0
        self.timings: dict[int, list[float]] = {}
        self._plan: list[int] = []
        self._position = 0
        self._recent: deque[float] = deque(maxlen=window)
        self._started = 0.0
        if self.auto:
            self._start_trial()

    def _start_trial(self) -> None:
        self._plan = [self.cores] * self.trial_steps + [1] * self.trial_steps
        self.timings = {self.cores: [], 1: []}
        self._position = 0
        self._recent.clear()
        self.trials += 1

    def before_step(self) -> None:
        if self._plan:
            torch.set_num_threads(self._plan[self._position])
        self._started = time.perf_counter()

    def after_step(self) -> bool:
        """Call after each step; True on the step where a trial decided."""
        seconds = time.perf_counter() - self._started
        if self._plan:
            if self._position % self.trial_steps:  # the first step after a switch pays for warm-up
                self.timings[self._plan[self._position]].append(seconds)
            self._position += 1
            if self._position < len(self._plan):
                return False
            self._plan = []
            self.chosen = min(self.timings, key=self.median)
            torch.set_num_threads(self.chosen)
            return True
        if self.auto and self.chosen is not None and self.chosen != 1:
            self._recent.append(seconds)
            if len(self._recent) == self._recent.maxlen and (
                statistics.median(self._recent) > self.recheck_factor * self.median(self.chosen)
            ):
                self._start_trial()
        return False

    def median(self, threads: int) -> float:
        times = self.timings.get(threads) or [math.inf]
        return statistics.median(times)

    def describe(self) -> str:
        timed = ", ".join(f"{n}: {self.median(n) * 1000:.0f} ms" for n in self.timings)
        return f"using {self.chosen} thread(s) (median step time with {timed})"


class Budget:
    """When to stop: after ``steps`` updates, ``epochs`` rounds or ``minutes`` of wall time, whichever
    comes first. The learning-rate schedule runs over the step count when there is one, so a run
    without a time budget follows the same schedule on any machine."""

    def __init__(self, config: TrainConfig, steps_per_epoch: int):
        self.seconds = None if config.minutes is None else config.minutes * 60.0
        self.epochs = config.epochs
        counts = [
            n
            for n in (config.steps, None if config.epochs is None else config.epochs * steps_per_epoch)
            if n is not None
        ]
        self.total_steps = min(counts) if counts else None
        self.steps = config.steps
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fraction(self, step: int) -> float:
        """How much of the run is behind us, 0..1 (the larger of time and step progress)."""
        parts = [0.0]
        if self.seconds:
            parts.append(self.elapsed() / self.seconds)
        if self.total_steps:
            parts.append(step / self.total_steps)
        return min(1.0, max(parts))

    def out_of_time(self, reserve: float = 0.0) -> bool:
        """True once the time budget (less ``reserve`` seconds kept for a last validation) is spent."""
        return self.seconds is not None and self.elapsed() + reserve >= self.seconds

    def steps_done(self, step: int) -> bool:
        return self.steps is not None and step >= self.steps

    def stop_before_step(self, step: int, reserve: float = 0.0) -> str:
        """Why no further update may run ("steps" or "time"), or "" while the budget lasts."""
        if self.steps_done(step):
            return "steps"
        if self.out_of_time(reserve):
            return "time"
        return ""

    def epochs_done(self, epoch: int) -> bool:
        return self.epochs is not None and epoch >= self.epochs


def scheduled_lr(base: float, floor: float, fraction: float, step: int, warmup_steps: int) -> float:
    """Linear warm-up over the first ``warmup_steps`` steps, then cosine decay from ``base`` to
    ``base * floor`` as ``fraction`` of the run goes 0 -> 1."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return warm * base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * fraction)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class Progress:
    """A live status line on stderr: rewritten in place on a terminal, a line every few seconds
    otherwise (logs, pipes, tests)."""

    def __init__(self, interval: float = 10.0, stream=None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.interval = interval
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = -math.inf
        self._width = 0

    def update(self, text: str) -> None:
        if not self.enabled:
            return
        if self.live:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
            self.stream.flush()
        elif time.perf_counter() - self._last >= self.interval:
            self._last = time.perf_counter()
            print(text, file=self.stream, flush=True)

    def line(self, text: str) -> None:
        """A line that stays (end of an epoch)."""
        if not self.enabled:
            return
        if self.live and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        print(text, file=self.stream, flush=True)


@dataclass
class History:
    """What happened during training; feeds the curves plot and the manifest metrics."""

    metric: str  # the validation figure that picks the best checkpoint, e.g. "val_bits_per_byte"
    higher_is_better: bool
    train: list[dict] = field(default_factory=list)  # {"step", "seconds", "samples", "loss", ...}
    val: list[dict] = field(default_factory=list)  # {"epoch", "step", "seconds", "samples", metric, ...}
    best_epoch: int = 0
    best_value: float | None = None
    steps: int = 0
    epochs: int = 0
    samples: int = 0  # bytes (LM) or sequences (classifier) trained on
    seconds: float = 0.0
    stopped_by: str = ""  # "steps", "epochs" or "time"
    threads: int = 0  # torch threads the run settled on

    def record_val(self, row: dict) -> bool:
        """Add a validation row; True if it is the best so far."""
        self.val.append(row)
        value = row[self.metric]
        better = self.best_value is None or (
            value > self.best_value if self.higher_is_better else value < self.best_value
        )
        if better:
            self.best_value, self.best_epoch = value, row["epoch"]
        return better

    def best_row(self) -> dict:
        """The validation row of the kept (best) epoch."""
        return next((row for row in self.val if row["epoch"] == self.best_epoch), {})

    def to_dict(self) -> dict:
        return asdict(self)


class BestCheckpoint:
    """Keeps a copy of the weights with the best validation figure and restores it at the end."""

    def __init__(self):
        self.state: dict | None = None

    def save(self, model: torch.nn.Module) -> None:
        self.state = copy.deepcopy(model.state_dict())

    def restore(self, model: torch.nn.Module) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def should_stop(history: History, budget: Budget, reserve: float = 0.0) -> bool:
    """After an epoch: record why training ends (step count, time budget or epoch count), if it does."""
    if history.stopped_by:
        return True
    reason = budget.stop_before_step(history.steps, reserve=reserve)
    if reason:
        history.stopped_by = reason
        return True
    if budget.epochs_done(history.epochs):
        history.stopped_by = "epochs"
        return True
    return False


def finish_training(
    model: torch.nn.Module, history: History, budget: Budget, threads: ThreadChooser, best: BestCheckpoint
):
    """Stamp the run's time and threads, put back the best checkpoint, return (model, history)."""
    history.seconds = round(budget.elapsed(), 2)
    history.threads = threads.chosen or torch.get_num_threads()
    best.restore(model)
    return model.eval(), history

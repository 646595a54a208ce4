"""Dense runs on the CPU provider, their buffers bound once (ONNX Runtime IO binding).

A generation cohort feeds the same rows one token at a time, hundreds of times over. Plain
``session.run`` converts each input, allocates each output and wraps it in a new array on every
call: for a one-row run of these models that is a sizeable part of the run (docs/bench.md,
"Dense runs with bound buffers"). Here a cohort's state lives in two buffer sets the runs
alternate between (run i reads set A and writes set B, run i+1 reads B and writes A), and both
runs were bound to their buffers once, so a token costs one copy of its ids and the run itself.

A failed run flips nothing: the set it read still holds the state from before it. Each binding
writes its own logits buffer too, so the logits a run returned stay as they were through the next
run, even a failed one.

Binding the two runs costs about as much as a couple of runs of one row, and a cohort of a lone
generation is made anew for every Generate call. So the bound runs outlive their cohort
(``DenseRuns``): once nothing holds the last state they returned, the next cohort of the same
shape loads its state into them instead of binding new buffers. That is known without any call
from the cohort: the runs keep only a weak reference to the state they returned.

Only small cohorts are bound (``BOUND_ROWS``): for them the per-call cost is a large share of a
run, while a large cohort's run dwarfs it, and its membership changes every few rounds (sessions
finish at different times), so it would pay for fresh buffers, page faults included, each time.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np

BOUND_ROWS = 16  # cohort runs of at most this many rows use bound buffers; larger ones session.run
# Bound runs kept per shape for later cohorts: the lanes' cohorts and, with batching off, the
# generations running at once; beyond it a cohort binds buffers of its own, as before.
KEPT_PER_SHAPE = 4


class DenseState(list):
    """The state a bound run returned: its arrays (views of the current buffer set), plus the runs
    that own them and the turn they are from. Only the latest turn may be run again: the set an
    older one points to is overwritten by the run after next."""

    __slots__ = ("runs", "turn", "__weakref__")

    runs: BoundRuns
    turn: int


class BoundRuns:
    """Two bound runs over one dense state of ``rows`` rows, taking turns."""

    def __init__(
        self, session: Any, names: tuple[str, list[str], str, list[str]], x: np.ndarray, state: list, width: int
    ):
        input_name, state_inputs, logits_name, state_outputs = names
        rows, seq = x.shape[:2]
        self.session = session
        self.x = np.empty(x.shape, x.dtype)
        self.logits = [np.empty((rows, seq, width), np.float32) for _ in range(2)]  # one per binding
        self.sets = [[np.empty(np.shape(a), np.float32) for a in state] for _ in range(2)]
        self.bindings = []
        for src, dst in ((0, 1), (1, 0)):
            io = session.io_binding()
            _bind(io.bind_input, input_name, self.x)
            for name, a in zip(state_inputs, self.sets[src]):
                _bind(io.bind_input, name, a)
            _bind(io.bind_output, logits_name, self.logits[src])
            for name, a in zip(state_outputs, self.sets[dst]):
                _bind(io.bind_output, name, a)
            self.bindings.append(io)
        self.current = 0  # the set holding the state
        self.turn = 0
        self.claimed = False  # loaded for a caller that has no state from these runs yet
        self._returned: weakref.ref | None = None  # the state the last run returned

    @property
    def idle(self) -> bool:
        """Nobody can run these again: no caller is about to, and the last state they returned is gone."""
        return not self.claimed and (self._returned is None or self._returned() is None)

    def load(self, state: list) -> None:
        """Take ``state`` (arrays, copied) as the state the next run reads."""
        for buffer, a in zip(self.sets[self.current], state):
            buffer[...] = a
        self.turn += 1  # a state returned before this load can no longer run

    def run(self, x: np.ndarray) -> tuple[np.ndarray, DenseState]:
        """Feed ``x``; return the logits (this object's buffer: valid until the run after next) and
        the new state."""
        self.x[...] = x
        read = self.current
        try:
            self.session.run_with_iobinding(self.bindings[read])
        except BaseException:
            self.claimed = False  # the caller holds what it ran, as before: nothing of these
            raise
        self.current ^= 1
        self.turn += 1
        state = DenseState(self.sets[self.current])
        state.runs, state.turn = self, self.turn
        self._returned = weakref.ref(state)
        self.claimed = False  # only now: until the line above these looked idle to another thread
        return self.logits[read], state


def _bind(bind: Any, name: str, array: np.ndarray) -> None:
    bind(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)


class DenseRuns:
    """One runtime's bound runs, kept by shape so a later cohort reuses idle ones."""

    def __init__(self, session: Any, names: tuple[str, list[str], str, list[str]], width: int):
        self.session = session
        self.names = names
        self.width = width
        self.kept: dict[tuple, list[BoundRuns]] = {}
        # lanes may run on the event loop and on the model thread at once
        self._lock = threading.Lock()

    def run(self, x: np.ndarray, state: list) -> tuple[np.ndarray, DenseState]:
        """Advance ``state`` (a DenseState from an earlier call, or arrays as the store reads them) by ``x``."""
        runs = state.runs if type(state) is DenseState else None
        if runs is None or runs.x.shape != x.shape or runs.x.dtype != x.dtype:
            runs = self._take(x, state)
            runs.load(state)
        elif state.turn != runs.turn:  # type: ignore[attr-defined]  # a DenseState, checked above
            raise RuntimeError("this dense state was advanced already: run the state the last run returned")
        return runs.run(x)

    def _take(self, x: np.ndarray, state: list) -> BoundRuns:
        """Idle bound runs of this shape, or new ones (kept for later while fewer than KEPT_PER_SHAPE)."""
        key = (x.shape, x.dtype)  # a runtime's state rows have one shape: x's rows fix the rest
        with self._lock:
            kept = self.kept.setdefault(key, [])
            runs = next((r for r in kept if r.idle), None)
            if runs is None:
                runs = BoundRuns(self.session, self.names, x, state, self.width)
                if len(kept) < KEPT_PER_SHAPE:
                    kept.append(runs)
            runs.claimed = True
        return runs

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

Only small cohorts are bound (``BOUND_ROWS``): for them the per-call cost is a large share of a
run, while a large cohort's run dwarfs it, and its membership changes every few rounds (sessions
finish at different times), so it would pay for fresh buffers, page faults included, each time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BOUND_ROWS = 16  # cohort runs of at most this many rows use bound buffers; larger ones session.run


class DenseState(list):
    """The state a bound run returned: its arrays (views of the current buffer set), plus the runs
    that own them and the turn they are from. Only the latest turn may be run again: the set an
    older one points to is overwritten by the run after next."""

    __slots__ = ("runs", "turn")

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
        first = [np.array(a, np.float32, order="C") for a in state]  # a copy: the caller's arrays stay theirs
        self.sets = [first, [np.empty_like(a) for a in first]]
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

    def run(self, x: np.ndarray) -> tuple[np.ndarray, DenseState]:
        """Feed ``x``; return the logits (this object's buffer: valid until the run after next) and
        the new state."""
        self.x[...] = x
        read = self.current
        self.session.run_with_iobinding(self.bindings[read])
        self.current ^= 1
        self.turn += 1
        state = DenseState(self.sets[self.current])
        state.runs, state.turn = self, self.turn
        return self.logits[read], state


def _bind(bind: Any, name: str, array: np.ndarray) -> None:
    bind(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)


def run_dense(session: Any, names: tuple, x: np.ndarray, state: list, width: int) -> tuple[np.ndarray, DenseState]:
    """Advance ``state`` (a DenseState from an earlier call, or arrays as the store reads them) by ``x``."""
    runs = state.runs if type(state) is DenseState else None
    if runs is None or runs.x.shape != x.shape or runs.x.dtype != x.dtype:
        runs = BoundRuns(session, names, x, state, width)
    elif state.turn != runs.turn:  # type: ignore[attr-defined]  # a DenseState, checked above
        raise RuntimeError("this dense state was advanced already: run the state the last run returned")
    return runs.run(x)

"""Host-memory recurrent state: one preallocated slab per state tensor, one slot per session.

Each slab is ``[layers, capacity, hidden]`` float32, the graph's own layout (batch axis 1), so a
batch's state is ``np.take(slab, slots, axis=1)`` and goes back with one fancy-indexed store.
Slots come from a free list (O(1) allocate and release); when they run out the slabs double.
Fresh slabs come from ``np.zeros`` (calloc), so pages of never-used slots are not resident.

Language models also keep each session's last logits row, so generation without a prompt can
sample from the distribution the previous step left behind.
"""

from __future__ import annotations

import numpy as np

from .slots import SlotPool

_F32 = np.dtype(np.float32)


class HostStateStore(SlotPool):
    """A StateStore (base.py) in host memory."""

    def __init__(self, layers: int, hidden: int, n_states: int, logits_width: int, initial_slots: int = 64):
        self.slabs: list[np.ndarray] = [np.zeros((layers, 0, hidden), _F32) for _ in range(n_states)]
        super().__init__(layers, hidden, n_states, logits_width, initial_slots)

    def _grow_slabs(self, old: int, new_capacity: int) -> None:
        grown = []
        for slab in self.slabs:
            bigger = np.zeros((self.layers, new_capacity, self.hidden), _F32)
            bigger[:, :old, :] = slab
            grown.append(bigger)
        self.slabs = grown

    def _zero_state(self, slot: int) -> None:
        for slab in self.slabs:
            slab[:, slot, :] = 0.0

    def _read(self, slots: np.ndarray) -> list[np.ndarray]:
        return [np.take(slab, slots, axis=1) for slab in self.slabs]

    def _write(self, slots: np.ndarray, rows: list[np.ndarray]) -> None:
        for slab, new in zip(self.slabs, rows):
            slab[:, slots, :] = new

    # -- the CPU runtime's hot path ----------------------------------------------------------------
    def read_one(self, slot: int) -> list[np.ndarray]:
        """One slot's state ``[layers, 1, hidden]``: basic slicing, several times cheaper than
        ``read`` for the lone-session path."""
        with self._lock:
            return [np.ascontiguousarray(slab[:, slot : slot + 1, :]) for slab in self.slabs]

    def store_run(self, slots: np.ndarray, rows: list[np.ndarray], logits: np.ndarray) -> None:
        """A run's new state, and for language models each row's last logits, into the slots."""
        with self._lock:  # growth replaces the last-logits array too: write into the current one
            last = self._last
            if len(slots) == 1:  # basic indexing: cheaper on the lone-session path
                slot = int(slots[0])
                for slab, new in zip(self.slabs, rows):
                    slab[:, slot : slot + 1, :] = new
                if last is not None:
                    last[slot] = logits[0, -1, :]
                return
            for slab, new in zip(self.slabs, rows):
                slab[:, slots, :] = new
            if last is not None:
                last[slots] = logits[:, -1, :]

"""Host-memory recurrent state: one preallocated slab per state tensor, one slot per session.

Each slab is ``[layers, capacity, hidden]`` float32, the graph's own layout (batch axis 1), so a
batch's state is ``np.take(slab, slots, axis=1)`` and goes back with one fancy-indexed store.
Slots come from a free list (O(1) allocate and release); when they run out the slabs double.
Fresh slabs come from ``np.zeros`` (calloc), so pages of never-used slots are not resident.

Language models also keep each session's last logits row, so generation without a prompt can
sample from the distribution the previous step left behind.
"""

from __future__ import annotations

import threading

import numpy as np

_F32 = np.dtype(np.float32)


class SlotPool:
    """Slot bookkeeping shared by the host and device stores: a free list, geometric growth, and
    the per-slot last-logits rows (host memory in both). Subclasses own the state slabs
    (``_grow_slabs``, ``_zero_state``)."""

    def __init__(self, layers: int, hidden: int, n_states: int, logits_width: int, initial_slots: int):
        self.layers = layers
        self.hidden = hidden
        self.n_states = n_states
        self.logits_width = logits_width
        self.capacity = 0
        self.in_use = 0
        self.last_logits: np.ndarray | None = np.zeros((0, logits_width), _F32) if logits_width else None
        self._free: list[int] = []
        # held by a model run from gather to scatter, and by growth (which replaces the slabs), so a
        # run on a worker thread never writes into slabs that were just copied
        self.lock = threading.Lock()
        self._grow(max(1, initial_slots))

    def _grow_slabs(self, old: int, new_capacity: int) -> None:
        raise NotImplementedError

    def _zero_state(self, slot: int) -> None:
        raise NotImplementedError

    def _grow(self, new_capacity: int) -> None:
        old = self.capacity
        self._grow_slabs(old, new_capacity)
        if self.last_logits is not None:
            last = np.zeros((new_capacity, self.logits_width), _F32)
            last[:old] = self.last_logits
            self.last_logits = last
        # pop() hands out the lowest free slot first, keeping live rows packed near the front
        self._free.extend(range(new_capacity - 1, old - 1, -1))
        self.capacity = new_capacity

    def alloc(self) -> int:
        """A zeroed slot (the model's initial state)."""
        if not self._free:
            with self.lock:
                self._grow(self.capacity * 2)
        self.in_use += 1
        return self._free.pop()

    def release(self, slot: int) -> None:
        self.zero(slot)
        self._free.append(slot)
        self.in_use -= 1

    def zero(self, slot: int) -> None:
        self._zero_state(slot)
        if self.last_logits is not None:
            self.last_logits[slot] = 0.0

    def last_rows(self, slots: np.ndarray) -> np.ndarray:
        return self.last_logits[slots]

    # -- accounting ----------------------------------------------------------------------------
    def bytes_per_slot(self) -> int:
        return 4 * (self.n_states * self.layers * self.hidden + self.logits_width)

    def state_bytes(self) -> int:
        """Bytes of live sessions' state (what the sessions themselves need)."""
        return self.in_use * self.bytes_per_slot()

    def allocated_bytes(self) -> int:
        """Bytes reserved by the slabs (virtual on the host: untouched pages are not resident)."""
        return self.capacity * self.bytes_per_slot()


class SlabStore(SlotPool):
    """Per-model-version state slots in host memory. ``last_logits`` is None for classifiers."""

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

    # -- batches -------------------------------------------------------------------------------
    def gather(self, slots: np.ndarray) -> list[np.ndarray]:
        """Contiguous ``[layers, len(slots), hidden]`` copies of the slots' state, in order."""
        return [np.take(slab, slots, axis=1) for slab in self.slabs]

    def gather_one(self, slot: int) -> list[np.ndarray]:
        """One slot's state ``[layers, 1, hidden]``: views when contiguous (one layer), else copies.
        Basic slicing: several times cheaper than ``gather`` for the single-session path."""
        return [np.ascontiguousarray(slab[:, slot:slot + 1, :]) for slab in self.slabs]

    def scatter_one(self, slot: int, states: list[np.ndarray], logits: np.ndarray) -> None:
        for slab, new in zip(self.slabs, states):
            slab[:, slot:slot + 1, :] = new
        if self.last_logits is not None:
            self.last_logits[slot] = logits[0, -1, :]

    def scatter(self, slots: np.ndarray, states: list[np.ndarray], logits: np.ndarray) -> None:
        """Store a run's new state (and, for LMs, each row's last logits) back into the slots."""
        for slab, new in zip(self.slabs, states):
            slab[:, slots, :] = new
        if self.last_logits is not None:
            self.last_logits[slots] = logits[:, -1, :]

    def write_states(self, slots: np.ndarray, states: list[np.ndarray]) -> None:
        """Store state rows back into the slots (no logits)."""
        for slab, new in zip(self.slabs, states):
            slab[:, slots, :] = new

    # -- snapshots -----------------------------------------------------------------------------
    def export_rows(self, slot: int) -> list[np.ndarray]:
        """Bit-exact copies of one session's state tensors ``[layers, 1, hidden]`` (+ last logits)."""
        rows = [slab[:, slot:slot + 1, :].copy() for slab in self.slabs]
        if self.last_logits is not None:
            rows.append(self.last_logits[slot:slot + 1].copy())
        return rows

    def import_rows(self, slot: int, rows: list[np.ndarray]) -> None:
        for slab, row in zip(self.slabs, rows):
            slab[:, slot:slot + 1, :] = row
        if self.last_logits is not None and len(rows) > len(self.slabs):
            self.last_logits[slot:slot + 1] = rows[len(self.slabs)]

"""Slot bookkeeping shared by the host and device stores: a free list, geometric growth, each
slot's last logits, byte accounting, and the store's lock.

Subclasses own the state slabs (``_grow_slabs``, ``_zero_state``, ``_read``, ``_write``); this class
wraps their reads and writes in the lock, so callers never take it themselves.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

_F32 = np.dtype(np.float32)


class SlotPool:
    """The part of a StateStore (base.py) that does not depend on where the slabs live."""

    def __init__(self, layers: int, hidden: int, n_states: int, logits_width: int, initial_slots: int):
        self.layers = layers
        self.hidden = hidden
        self.n_states = n_states
        self.logits_width = logits_width
        self.capacity = 0
        self.in_use = 0
        # Host memory in both stores: generation samples from them on the host.
        self._last: np.ndarray | None = np.zeros((0, logits_width), _F32) if logits_width else None
        self._free: list[int] = []
        # Held by every read and write of the slabs and by growth (which replaces them), so a run
        # on the model thread never writes into slabs that growth just copied.
        self._lock = threading.Lock()
        self._grow(max(1, initial_slots))

    # -- for subclasses ------------------------------------------------------------------------
    def _grow_slabs(self, old: int, new_capacity: int) -> None:
        raise NotImplementedError

    def _zero_state(self, slot: int) -> None:
        raise NotImplementedError

    def _read(self, slots: np.ndarray) -> list[Any]:
        raise NotImplementedError

    def _write(self, slots: np.ndarray, rows: list[Any]) -> None:
        raise NotImplementedError

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's lock across a run that reads and writes the slabs itself (device.py's
        step graph binds them as its input and output)."""
        with self._lock:
            yield

    # -- slots ---------------------------------------------------------------------------------
    def _grow(self, new_capacity: int) -> None:
        old = self.capacity
        self._grow_slabs(old, new_capacity)
        if self._last is not None:
            last = np.zeros((new_capacity, self.logits_width), _F32)
            last[:old] = self._last
            self._last = last
        # pop() hands out the lowest free slot first, keeping live rows packed near the front
        self._free.extend(range(new_capacity - 1, old - 1, -1))
        self.capacity = new_capacity

    def allocate(self) -> int:
        if not self._free:
            with self._lock:
                self._grow(self.capacity * 2)
        self.in_use += 1
        return self._free.pop()

    def release(self, slot: int) -> None:
        self.zero(slot)
        self._free.append(slot)
        self.in_use -= 1

    def zero(self, slot: int) -> None:
        with self._lock:
            self._zero_state(slot)
        if self._last is not None:
            self._last[slot] = 0.0

    def read(self, slots: np.ndarray) -> list[Any]:
        with self._lock:
            return self._read(slots)

    def write(self, slots: np.ndarray, rows: list[Any]) -> None:
        with self._lock:
            self._write(slots, rows)

    # -- last logits (language models) ---------------------------------------------------------
    def last_logits(self, slots: np.ndarray) -> np.ndarray:
        if self._last is None:
            raise ValueError("this store keeps no last logits (the model is not a language model)")
        return self._last[slots]

    def set_last_logits(self, slots: Any, rows: np.ndarray) -> None:
        if self._last is not None:
            self._last[slots] = rows

    # -- snapshots -------------------------------------------------------------------------------
    def export_rows(self, slot: int) -> list[np.ndarray]:
        rows = [np.asarray(self._to_host(r)) for r in self.read(np.array([slot], np.intp))]
        if self._last is not None:
            rows.append(self._last[slot : slot + 1].copy())
        return rows

    def import_rows(self, slot: int, rows: list[np.ndarray]) -> None:
        if len(rows) not in (self.n_states, self.n_states + (self._last is not None)):
            raise ValueError(f"expected {self.n_states} state rows (+ last logits), got {len(rows)}")
        shape = (self.layers, 1, self.hidden)
        for row in rows[: self.n_states]:
            if row.shape != shape or row.dtype != _F32:
                raise ValueError(f"state rows must be float32 {shape}, got {row.dtype} {row.shape}")
        self.write(np.array([slot], np.intp), [self._from_host(r) for r in rows[: self.n_states]])
        if self._last is not None and len(rows) > self.n_states:
            self._last[slot : slot + 1] = rows[self.n_states]

    def _to_host(self, value: Any) -> np.ndarray:
        return np.array(value, copy=True)

    def _from_host(self, array: np.ndarray) -> Any:
        return array

    # -- accounting ----------------------------------------------------------------------------
    def bytes_per_slot(self) -> int:
        return 4 * (self.n_states * self.layers * self.hidden + self.logits_width)

    def state_bytes(self) -> int:
        return self.in_use * self.bytes_per_slot()

    def allocated_bytes(self) -> int:
        return self.capacity * self.bytes_per_slot()

"""A model run's input arrays, made from queued work items.

``batch(n, items)`` stacks the items' inputs (all ``n`` long) into ``x`` ([batch, n] token ids or
[batch, n, dim] frames) and their sessions' slots. ``lone(item)`` does the same for one item from
arrays made once per token id and per slot: the lone-session path then makes no numpy arrays of
its own (each numpy call costs more there than it seems, as the model run before it has evicted
the caches; see docs/server.md, "A lone session").
"""

from __future__ import annotations

import numpy as np


class RunInputs:
    """Builds ``(x, slots)`` for one model's runs."""

    def __init__(self, tokens: bool):
        self.tokens = tokens  # token ids (int64) rather than float32 frames
        self._token_rows: dict[int, np.ndarray] = {}  # token id -> [[id]]; at most the vocabulary
        self._slot_rows: dict[int, np.ndarray] = {}  # slot -> [slot]; at most the slab capacity

    def batch(self, n: int, items: list) -> tuple[np.ndarray, np.ndarray]:
        b = len(items)
        slots = np.fromiter((it.session.slot for it in items), np.intp, b)
        if self.tokens and n == 1:
            x = np.fromiter((it.x for it in items), np.int64, b).reshape(b, 1)
        else:
            x = np.stack([it.x for it in items])
        return x, slots

    def lone(self, item) -> tuple[np.ndarray, np.ndarray]:
        slot = item.session.slot
        slots = self._slot_rows.get(slot)
        if slots is None:
            slots = self._slot_rows[slot] = np.array([slot], np.intp)
        if self.tokens and item.n == 1:
            x = self._token_rows.get(item.x)
            if x is None:
                x = self._token_rows[item.x] = np.array([[item.x]], np.int64)
            return x, slots
        return item.x[None], slots

"""Chunked prefill: a long step or prompt runs as several shorter runs off the event loop (on a CPU
on a thread of their own at a lower OS priority, on a GPU on the model thread) while the loop
serves everybody else, instead of holding it for the whole of it.

An item longer than the scheduler's chunk (``max_prefill_chunk`` positions) is fed by Pieces: one
model-run row standing for the next ``chunk`` positions of the item. The state after each piece
stays in the session's slot, which is why the pieces add up exactly to the whole run (a recurrent
layer's state after n positions is all that position n + 1 needs). The session's position moves,
and the answer goes out, only when the last piece has run, so a client sees nothing but timing; a
failure or a cancelled generation halfway puts back the slot's state (and last logits) from the
snapshot taken before the first piece, so the item counts as not run at all.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import numpy as np

from .work import StepItem


class Completion(Protocol):
    """What a run of pieces needs to answer the items it finished (completion.RunCompletion,
    a module beside this one in the server's layers, so named here only by its shape)."""

    stats: Any

    def complete(self, items: list, logits: np.ndarray, started: float) -> tuple[list, np.ndarray] | None: ...


class Progress:
    """How far a chunked item got: positions fed, the slot's state before the first piece, and
    (for a step answering every position) the logits of the pieces so far."""

    __slots__ = ("done", "saved", "rows")

    def __init__(self, saved: list[np.ndarray]):
        self.done = 0
        self.saved = saved
        self.rows: list[np.ndarray] = []


class Piece:
    """The next ``n`` positions of a chunked ``item``: what a run needs of a work item (session,
    n, x, arrival) and whether it is the item's last piece."""

    __slots__ = ("item", "session", "n", "x", "arrived", "final")

    def __init__(self, item, n: int, x, final: bool):
        self.item = item
        self.session = item.session
        self.n = n
        self.x = x
        self.arrived = item.arrived
        self.final = final


def next_piece(item, chunk: int, store, tokens: bool) -> Piece | None:
    """The item's next piece, or None when the item runs whole (it fits in one chunk)."""
    progress = item.chunked
    if progress is None:
        if item.n <= chunk:
            return None
        progress = item.chunked = Progress(store.export_rows(item.session.slot))
    start = progress.done
    n = min(chunk, item.n - start)
    x = item.x[start : start + n]
    if tokens and n == 1:  # one token is an int in a run's input, as for a one-token step
        x = int(x[0])
    return Piece(item, n, x, start + n == item.n)


def restore(item, store) -> None:
    """Undo the pieces of ``item`` that ran (it failed, or its generation was cancelled, halfway)."""
    progress = item.chunked
    if progress is not None:
        item.chunked = None
        store.import_rows(item.session.slot, progress.saved)


def complete_pieces(
    items: list, logits: np.ndarray, started: float, completion: Completion
) -> tuple[list, np.ndarray] | None:
    """After a run holding pieces of long items (and maybe whole items of the same length): a last
    piece completes its item through ``completion``, with every piece's
    logits when it answers every position; the others only record their progress. Returns what
    ``RunCompletion.complete`` does: the generations whose prompt is now fed, with their logits."""
    rows: list[int] = []
    whole: list = []
    spread: list = []  # (item, its logits over all positions [1, n, width])
    for row, it in enumerate(items):
        if type(it) is not Piece:
            rows.append(row)
            whole.append(it)
            continue
        item, progress = it.item, it.item.chunked
        pending = it.session.pending
        if progress is None or not pending or pending[0] is not item:
            continue  # its session ended during the run and refused it (Session.end)
        every = type(item) is StepItem and item.plan.all_positions
        if every:
            progress.rows.append(logits[row].copy())
        if not it.final:
            progress.done += it.n
            continue
        item.chunked = None
        if every:
            spread.append((item, np.concatenate(progress.rows)[None]))
        else:
            rows.append(row)
            whole.append(item)
    joining = None
    if whole:
        joining = completion.complete(whole, logits if len(rows) == len(items) else logits[rows], started)
    else:
        completion.stats.count_run(len(items), logits.shape[1], time.perf_counter() - started)
    for item, all_logits in spread:
        completion.complete([item], all_logits, started)
    return joining

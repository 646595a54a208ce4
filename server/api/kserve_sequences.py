"""Triton sequences on seqserve sessions: which session a (model, version, sequence id) steps.

A request carrying ``sequence_start`` starts its sequence: the engine creates a session for it
(as CreateSession would), or, for an id already running, the sequence restarts from the model's
initial state. Requests without the flag step the sequence's session; one with ``sequence_end``
is the last: the id is free again at once, and the session is closed as soon as that step (and any
queued before it) has been answered. Requests of one sequence are answered in order, as on the
native API.

Sessions made here get the engine's random, unguessable ids, and this API never shows them, so
the native API cannot step a sequence's session; this table only knows sessions it created, so a
KServe client cannot step a native session either. The two APIs share the engine, its session
limits, TTL and eviction, not sessions (docs/triton-compat.md).
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..errors import Reason, ServeError, invalid

Key = tuple[str, int, "int | str"]  # model name, resolved version, sequence id (int and str ids differ)

# what a step hears when its sequence's session ended under it, and how a Triton client is told
_GONE = {
    Reason.SESSION_EXPIRED: "expired after being idle longer than idle_ttl_s",
    Reason.SESSION_EVICTED: "was evicted to make room for a new session (the least recently used idle one)",
    Reason.SESSION_CLOSED: "was closed",
    Reason.SESSION_NOT_FOUND: "is gone",
}


class Sequence:
    """One running sequence: its session and the steps sent to it that are not answered yet."""

    __slots__ = ("key", "session_id", "outstanding", "ended")

    def __init__(self, key: Key, session_id: str):
        self.key = key
        self.session_id = session_id
        self.outstanding = 0
        self.ended = False  # no further step may join; close the session once outstanding is 0


class SequenceTable:
    """The running sequences of the KServe API, all models together."""

    def __init__(self, engine: Any, prune_min: int = 1024):
        self.engine = engine
        self.live: dict[Key, Sequence] = {}
        # Sequences whose sessions the engine ended (TTL, eviction) stay here until their id is used
        # again; past this many entries the table drops those, so it cannot grow without bound.
        self._prune_min = self._prune_at = prune_min

    def begin(self, model: str, version: int, sequence_id: int | str, start: bool, end: bool) -> Sequence:
        """The sequence a request steps, started or restarted first if it asks; the caller must
        call ``done`` once the request is answered (or fails)."""
        key = (model, version, sequence_id)
        seq = self.live.get(key)
        if start:
            seq = self._start(key, seq)
        elif seq is None:
            raise not_started(model, sequence_id)
        seq.outstanding += 1
        if end:
            self._retire(seq)
        return seq

    def done(self, seq: Sequence) -> None:
        seq.outstanding -= 1
        if seq.ended and not seq.outstanding:
            # Not at once: a stream's answer is delivered from inside the scheduler's completion of
            # a run, and a session is closed from outside it, as CloseSession would be.
            asyncio.get_running_loop().call_soon(self._close, seq.session_id)

    def _close(self, session_id: str) -> None:
        try:
            self.engine.close_session(session_id)
        except ServeError:  # ended already (expired, evicted, server stopping)
            pass

    def refusal(self, seq: Sequence, err: ServeError) -> ServeError:
        """The error to send for a step of ``seq`` that failed with ``err``: if the session is gone
        the sequence is over, and the client hears it as Triton says it (START is needed)."""
        why = _GONE.get(err.reason)
        if why is None:
            return err
        self._retire(seq)
        model, _, sequence_id = seq.key
        ended = {"ended_at": err.metadata["ended_at"]} if "ended_at" in err.metadata else {}
        return not_started(model, sequence_id, f"its session {why}", **ended)

    def _start(self, key: Key, seq: Sequence | None) -> Sequence:
        if seq is not None:
            if not seq.outstanding:
                try:  # restart in place: same session, state back to zero
                    self.engine.reset_session(seq.session_id)
                    return seq
                except ServeError:  # its session ended meanwhile: start afresh
                    pass
            self._retire(seq)  # earlier steps still run on the old session, which then closes
        model, version, _ = key
        view = self.engine.create_session(model, version)
        seq = self.live[key] = Sequence(key, view.session_id)
        if len(self.live) > self._prune_at:
            self._prune()
        return seq

    def _retire(self, seq: Sequence) -> None:
        seq.ended = True
        if self.live.get(seq.key) is seq:
            del self.live[seq.key]

    def _prune(self) -> None:
        for seq in [s for s in self.live.values() if not s.outstanding]:
            try:
                self.engine.get_session(seq.session_id)
            except ServeError:
                del self.live[seq.key]
        self._prune_at = max(self._prune_min, 2 * len(self.live))


def not_started(model: str, sequence_id: int | str, why: str = "", **metadata: object) -> ServeError:
    """Triton's refusal of a step for a sequence that has not started (its wording, so clients
    and people who know Triton recognise it), with the reason seqserve knows when it has one."""
    message = (
        f"inference request for sequence {sequence_id} to model '{model}' must specify the START flag "
        "on the first request of the sequence"
    )
    if why:
        message += f" ({why})"
    return invalid(Reason.SEQUENCE_NOT_STARTED, message, model=model, sequence_id=sequence_id, **metadata)

"""Bookkeeping of a multiplexed StepStream, shared by the blocking and asyncio flavours.

Many sessions share one bidirectional stream. Each step gets a unique tag and the result is
matched back by that tag. A session has at most one step on the wire: its next step is built
(with the expected position the previous result gave) only when the previous one is answered.
That keeps resends after a dropped stream exactly-once: the step on the wire is the session's
latest, which the server recognises and answers from its cache if it already applied it.

The book itself does no I/O and takes no locks; its owner serialises access.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from seqserve.v1 import seqserve_pb2 as pb

from .errors import SeqServeError, error_from_step_error
from .messages import StepInput, step_request
from .session_base import SessionBase
from .types import Output, StepResult

__all__ = ["MuxItem", "MuxBook", "resolve_result"]


@dataclass
class MuxItem:
    """One submitted step: where it goes, what it asks, and the handle its caller waits on."""

    tag: int
    session: SessionBase
    part: StepInput
    output: Output
    handle: Any  # a concurrent.futures.Future or an asyncio.Future
    request: pb.StepRequest | None = field(default=None, repr=False)


class MuxBook:
    """Which steps wait, which are on the wire, and what to resend after a reconnect."""

    def __init__(self) -> None:
        self._last_tag = 0
        self._waiting: dict[str, deque[MuxItem]] = {}
        self._on_wire: dict[int, MuxItem] = {}
        self._busy: set[str] = set()

    def new_tag(self) -> int:
        """A tag no other step of this stream has."""
        self._last_tag += 1
        return self._last_tag

    @property
    def outstanding(self) -> int:
        """Steps submitted and not yet answered (waiting or on the wire)."""
        return len(self._on_wire) + sum(len(q) for q in self._waiting.values())

    def _dispatch(self, item: MuxItem) -> MuxItem:
        self._busy.add(item.session.id)
        item.request = step_request(item.session.id, item.session.position, item.part, item.output, item.tag)
        self._on_wire[item.tag] = item
        return item

    def add(self, item: MuxItem) -> MuxItem | None:
        """Register a step; returns it if it should be sent now, ``None`` if it waits for its session."""
        sid = item.session.id
        if sid in self._busy:
            self._waiting.setdefault(sid, deque()).append(item)
            return None
        return self._dispatch(item)

    def pop(self, tag: int) -> MuxItem | None:
        """The step a result with ``tag`` answers (``None`` for an unknown tag)."""
        return self._on_wire.pop(tag, None)

    def release(self, session_id: str) -> MuxItem | None:
        """The session's step was answered: return its next waiting step, now on the wire, if any."""
        self._busy.discard(session_id)
        queue = self._waiting.get(session_id)
        if not queue:
            self._waiting.pop(session_id, None)
            return None
        item = queue.popleft()
        if not queue:
            del self._waiting[session_id]
        return self._dispatch(item)

    def on_wire(self) -> list[MuxItem]:
        """Steps sent and not answered, oldest first (what a new stream must resend)."""
        return [self._on_wire[tag] for tag in sorted(self._on_wire)]

    def drain(self) -> list[MuxItem]:
        """Remove and return every outstanding step (to fail them)."""
        items = self.on_wire() + [item for q in self._waiting.values() for item in q]
        self._on_wire.clear()
        self._waiting.clear()
        self._busy.clear()
        return items


def resolve_result(item: MuxItem, msg: pb.StepResult) -> StepResult | SeqServeError:
    """Turn a stream result into the step's outcome; advances the session's position on success."""
    if msg.HasField("error") and msg.error.code != 0:
        err = msg.error
        return error_from_step_error(err.code, err.message, err.reason, dict(err.metadata))
    result = StepResult.from_proto(msg)
    item.session._advance(result.position)
    return result

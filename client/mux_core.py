"""Bookkeeping and decisions of a multiplexed StepStream, shared by the blocking and asyncio flavours.

Many sessions share one bidirectional stream (PackedStepStream, where the steps waiting to be sent
leave as one message; or StepStream, one step per message). Each step gets a unique tag and the result is
matched back by that tag. A session has at most one step on the wire: its next step is built
(with the expected position the previous result gave) only when the previous one is answered.
That keeps resends after a dropped stream exactly-once: the step on the wire is the session's
latest, which the server recognises and answers from its cache if it already applied it.

StepStream (threads) and AsyncStepStream (a task) only move messages: every decision (what to
send, when to resend, what to fail and with which error, whether a caller's handle may still be
resolved) is made by :class:`StreamCore` here, which does no I/O and takes no locks; its owner
serialises access.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from seqserve.v1 import seqserve_pb2 as pb

from .config import ClientConfig
from .errors import Cancelled, SeqServeError, Unavailable, error_from_rpc, error_from_step_error
from .messages import StepInput, shared_spec, step_request
from .retry import Resends, is_retryable
from .session_base import SessionBase
from .types import Output, StepResult

__all__ = [
    "Handle",
    "MuxItem",
    "MuxBook",
    "Answer",
    "StreamEnd",
    "StreamCore",
    "resolve_result",
    "settle",
    "packed_steps",
    "unimplemented",
    "PACKED_MARK",
]


class Handle(Protocol):
    """What a caller waits on: a ``concurrent.futures.Future`` or an ``asyncio.Future``."""

    def done(self) -> bool: ...

    def set_result(self, result: StepResult, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


@dataclass
class MuxItem:
    """One submitted step: where it goes, what it asks, and the handle its caller waits on.
    ``expected``: the session's position when the step was put on the wire (what it expects)."""

    tag: int
    session: SessionBase
    part: StepInput
    output: Output
    handle: Handle
    expected: int | None = None
    request: pb.StepRequest | None = field(default=None, repr=False)

    def step_request(self) -> pb.StepRequest:
        """The step as a StepRequest (made once: a resend sends the same one)."""
        if self.request is None:
            self.request = step_request(self.session.id, self.expected, self.part, self.output, self.tag)
        return self.request


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
        item.expected = item.session.position
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


def settle(item: MuxItem, outcome: StepResult | SeqServeError) -> None:
    """Resolve the caller's handle with ``outcome``, unless it is already done (cancelled by the caller)."""
    if item.handle.done():
        return
    if isinstance(outcome, SeqServeError):
        item.handle.set_exception(outcome)
    else:
        item.handle.set_result(outcome)


@dataclass(frozen=True)
class Answer:
    """A result matched to its step: settle ``item`` with ``outcome``, then send ``ready`` if any."""

    item: MuxItem
    outcome: StepResult | SeqServeError
    ready: MuxItem | None


@dataclass(frozen=True)
class StreamEnd:
    """What to do once the StepStream call ended.

    ``resend_after`` seconds: open a new call and resend :meth:`StreamCore.on_wire`; ``None``: drop
    the call (the next submit opens a fresh one) and fail ``failed`` with ``error``.
    """

    resend_after: float | None
    failed: list[MuxItem]
    error: SeqServeError


# What a server that serves PackedStepStream puts in the call's first metadata (see aio_stream.py).
PACKED_MARK = ("seqserve-stream", "packed")


def packed_steps(items: list[MuxItem]) -> pb.PackedSteps:
    """One PackedStepStream message for ``items``: token steps asking for the same output leave
    as one StepColumns block (a column per field, no message per step), lone ones and feature
    frames as StepRequests. Each session has one step on the wire at most, so how they are
    grouped changes no session's order."""
    message = pb.PackedSteps(columns=True)  # this client reads ResultColumns
    groups: dict[tuple[Output, bool], list[MuxItem]] = {}
    for item in items:
        if item.part.frames is not None:
            message.steps.append(item.step_request())
        else:
            groups.setdefault((item.output, item.expected is None), []).append(item)
    for (output, unchecked), group in groups.items():
        if len(group) == 1:
            message.steps.append(group[0].step_request())
            continue
        block = message.step_columns.add(
            session_ids=[it.session.id for it in group],
            tags=[it.tag for it in group],
            tokens=[t for it in group for t in it.part.tokens],
            output=shared_spec(output),
        )
        if not unchecked:
            block.expected_positions.extend([it.expected for it in group])  # type: ignore[misc]
        lengths = [len(it.part.tokens) for it in group]
        if any(n != 1 for n in lengths):
            block.lengths.extend(lengths)
    return message


def unimplemented(exc: BaseException | None) -> bool:
    """True when the call failed because the server lacks the method (an older server)."""
    code = getattr(exc, "code", None)
    return isinstance(exc, grpc.RpcError) and callable(code) and code() == grpc.StatusCode.UNIMPLEMENTED


def closed_error() -> Cancelled:
    return Cancelled("stream closed before the step was answered", grpc.StatusCode.CANCELLED)


class StreamCore:
    """One multiplexed stream's state: its book of steps, whether it is closed, its resends."""

    def __init__(self, config: ClientConfig):
        self.book = MuxBook()
        self.closed = False
        self._resends = Resends(config)

    @property
    def outstanding(self) -> int:
        return self.book.outstanding

    def submit(self, session: SessionBase, part: StepInput, output: Output, handle: Handle) -> MuxItem | None:
        """Register a step; returns it if its request should be sent now. Raises on a closed stream."""
        if self.closed:
            raise ValueError("stream is closed")
        return self.book.add(MuxItem(self.book.new_tag(), session, part, output, handle))

    def answer(self, msg: pb.StepResult) -> Answer | None:
        """Match a result to its step (``None`` for a tag no step waits on)."""
        item = self.book.pop(msg.tag)
        if item is None:
            return None
        self._resends.reset()  # the stream works: a later drop gets the full number of resends
        outcome = resolve_result(item, msg)
        return Answer(item, outcome, self.book.release(item.session.id))

    def answer_columns(self, block: pb.ResultColumns) -> list[Answer]:
        """Match the rows of a ResultColumns block to their steps (rows no step waits on are skipped)."""
        answers = []
        book = self.book
        for result in StepResult.from_columns(block):
            item = book.pop(result.tag)
            if item is None:
                continue
            item.session._advance(result.position)
            answers.append(Answer(item, result, book.release(item.session.id)))
        if answers:
            self._resends.reset()
        return answers

    def ended(self, exc: grpc.RpcError | None) -> StreamEnd:
        """The call ended, by failing with ``exc`` or (``None``) by the server closing it.

        With nothing outstanding that is no failure. Otherwise the unanswered steps are resent on
        a new call while resends are left (a server that closes the stream early counts as a drop),
        and failed with the call's error when not.
        """
        if exc is None:
            error: SeqServeError = Unavailable("the server ended the step stream", grpc.StatusCode.UNAVAILABLE)
            retryable = True
        else:
            error, retryable = error_from_rpc(exc), is_retryable(exc)
            error.__cause__ = exc
        if self.book.outstanding == 0:
            return StreamEnd(None, [], error)
        delay = self._resends.next(retryable)
        return StreamEnd(delay, [] if delay is not None else self.book.drain(), error)

    def on_wire(self) -> list[MuxItem]:
        """The steps a new call must resend, oldest first."""
        return self.book.on_wire()

    def close(self, cancel: bool) -> list[MuxItem]:
        """Refuse new steps; with ``cancel``, also return every outstanding step to fail with :func:`closed_error`."""
        self.closed = True
        return self.book.drain() if cancel else []

    def give_up(self) -> list[MuxItem]:
        """Closing waited long enough: return the steps still outstanding, to fail with :func:`closed_error`."""
        return self.book.drain()

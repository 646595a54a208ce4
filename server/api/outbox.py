"""A StepStream's outbox: answers in completion order, converted as they are queued, read by the
stream's writer (servicer.py). It is the engine's StepSink for every step read from that stream."""

from __future__ import annotations

import asyncio
from collections import deque

from ..domain import StepOutput
from ..errors import ServeError
from .calls import CallCounts, ok_key
from .convert import error_result, step_result


class StreamOutbox:
    """Answers waiting to be written, and the flow-control state of one stream."""

    __slots__ = ("out", "waiter", "space", "sent", "received", "input_done", "writing", "holding", "calls", "rpc", "ok")

    def __init__(self, calls: CallCounts, rpc: str) -> None:
        self.calls = calls  # every answer counts as one request of ``rpc``
        self.rpc = rpc
        self.ok = ok_key(rpc)
        self.out: deque = deque()
        self.waiter: asyncio.Future | None = None  # the writer waiting for answers
        self.space: asyncio.Future | None = None  # the reader waiting for the writer to catch up
        self.received = 0  # steps read from the client
        self.sent = 0  # answers written back
        self.input_done = False
        self.writing = False  # a write is in progress (by the writer, or by the reader for its own answer)
        self.holding = False  # the reader is queueing a step: it looks at the outbox itself afterwards

    def push(self, result: StepOutput) -> None:
        self.calls.counts[self.ok] += 1
        self._queue(step_result(result))

    def push_error(self, session_id: str, tag: int, err: ServeError) -> None:
        self.calls.failed(self.rpc, err)
        self._queue(error_result(session_id, tag, err))

    def _queue(self, message: object) -> None:
        self.out.append(message)
        if not self.holding:
            self.wake()

    def wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

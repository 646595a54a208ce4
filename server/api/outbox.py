"""A StepStream's outbox: answers in completion order, converted as they are queued, read by the
stream's writer (servicer.py). It is the engine's StepSink for every step read from that stream.

A PackedStepStream's outbox (PackedOutbox) gathers answers into one PackedResults message until
the writer takes it: everything a model run completed (one tick pushes all its answers before the
writer can run) leaves as one message, and a result never waits for other steps of its request.
``out`` then holds PackedResults messages; ``size`` says how many answers a message carries."""

from __future__ import annotations

import asyncio
from collections import deque

from seqserve.v1 import seqserve_pb2 as pb

from ..domain import StepAnswers, StepOutput
from ..errors import ServeError
from .calls import CallCounts, ok_key
from .convert import add_columns, add_step_result, error_result, step_result
from .status import error_message


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

    def push_answers(self, answers: StepAnswers, rows: list[int] | None) -> None:
        for out in answers.outputs(rows):
            self.push(out)

    def push_error(self, session_id: str, tag: int, err: ServeError) -> None:
        self.calls.failed(self.rpc, err)
        self._queue(error_result(session_id, tag, err))

    def _queue(self, message: object) -> None:
        self.out.append(message)
        if not self.holding:
            self.wake()

    @staticmethod
    def size(message: object) -> int:
        """Answers in one queued message."""
        return 1

    def wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)


class PackedOutbox(StreamOutbox):
    """A PackedStepStream's outbox: answers go into the PackedResults the writer takes next. Once
    the client has said it reads columns (PackedSteps.columns), a run's answers with one position
    each go in as one ResultColumns block (convert.add_columns) instead of a StepResult per step."""

    __slots__ = ("open", "columns")

    def __init__(self, calls: CallCounts, rpc: str) -> None:
        super().__init__(calls, rpc)
        self.open: pb.PackedResults | None = None  # the message still in ``out``, taking answers
        self.columns = False  # the client reads ResultColumns

    def push(self, result: StepOutput) -> None:
        self.calls.counts[self.ok] += 1
        add_step_result(self._message(True).results, result)
        if not self.holding:
            self.wake()

    def push_answers(self, answers: StepAnswers, rows: list[int] | None) -> None:
        if not self.columns or answers.steps != 1:
            super().push_answers(answers, rows)
            return
        self.calls.counts[self.ok] += len(answers) if rows is None else len(rows)
        add_columns(self._message(False).columns, answers, rows)
        if not self.holding:
            self.wake()

    def push_error(self, session_id: str, tag: int, err: ServeError) -> None:
        self.calls.failed(self.rpc, err)
        self._message(True).results.add(session_id=session_id, tag=tag, error=error_message(err))
        if not self.holding:
            self.wake()

    def _message(self, result: bool) -> pb.PackedResults:
        # The open message is the last one in ``out`` until the writer pops it; after that, answers
        # start a new one (a message being written is never changed). A message's StepResults come
        # before its columns in the stream's order, so a StepResult after columns starts a new one.
        out, message = self.out, self.open
        if message is None or not out or out[-1] is not message or (result and len(message.columns)):
            message = self.open = pb.PackedResults()
            out.append(message)
        return message

    @staticmethod
    def size(message: object) -> int:
        results, columns = message.results, message.columns  # type: ignore[attr-defined]
        return len(results) + sum(len(block.tags) for block in columns)

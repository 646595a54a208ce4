"""Blocking multiplexer: many sessions' steps over one StepStream, read on a background thread.

Written by hand (threads and queues have no token-for-token asyncio twin), like aio_stream.py; all
decisions are made by the shared :class:`~seqserve.client.mux_core.StreamCore`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from seqserve.v1 import seqserve_pb2 as pb

from .messages import Inputs, to_step_input
from .mux_core import MuxItem, StreamCore, closed_error, packed_steps, settle, unimplemented
from .session import Session
from .session_base import make_output
from .types import Output, Sampling, StepResult

if TYPE_CHECKING:
    from .client import Client

__all__ = ["StepStream"]

_END = None  # put on a request queue to half-close that call


class _Call(Protocol):
    def __iter__(self) -> Iterator[Any]: ...

    def cancel(self) -> bool: ...


def _requests(q: queue.Queue[MuxItem | None]) -> Iterator[pb.StepRequest]:
    while True:
        item = q.get()
        if item is None:  # _END
            return
        yield item.step_request()


def _packed_requests(q: queue.Queue[MuxItem | None]) -> Iterator[pb.PackedSteps]:
    """Every step queued by the time the call asks for its next message goes into that message."""
    while True:
        item = q.get()
        if item is None:  # _END
            return
        items = [item]
        while True:
            try:
                item = q.get_nowait()
            except queue.Empty:
                break
            if item is None:  # _END
                yield packed_steps(items)
                return
            items.append(item)
        yield packed_steps(items)


class StepStream:
    """Steps of many sessions multiplexed over one bidirectional stream (see ``Client.stream``).

    ``submit`` returns a ``concurrent.futures.Future`` and blocks while ``window`` steps are
    already outstanding: memory stays bounded however fast callers submit. Steps of one session
    run in submission order; different sessions' steps overlap. If the stream drops, the steps on
    the wire are resent on a new stream (exactly-once, via their expected positions).

    ``submit`` may be called from many threads. Futures resolve on the stream's reader thread, so
    a future's done-callback must not call ``submit`` (it could wait for a slot only that thread frees).

    ``packed`` (the default): the steps waiting to be sent leave together, as one PackedStepStream
    message, so many sessions stepping at once cost the server one message and share one model run.
    A server without PackedStepStream (UNIMPLEMENTED) gets the steps one per StepStream message.
    """

    def __init__(self, client: Client, window: int, packed: bool = True):
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self._client = client
        self.window = window
        self.packed = packed
        self._slots = threading.BoundedSemaphore(window)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._core = StreamCore(client.config)
        self._sendq: queue.Queue[MuxItem | None] | None = None
        self._call: _Call | None = None
        self._reader: threading.Thread | None = None

    # -- public API ----------------------------------------------------------------------------
    def submit(
        self,
        session: Session,
        inputs: Inputs,
        output: Output | None = None,
        *,
        top_k: int = 0,
        logits: bool = False,
        argmax: bool = False,
        probs: bool = False,
        sample: Sampling | None = None,
        all_positions: bool = False,
        none: bool = False,
    ) -> Future[StepResult]:
        """Queue one step for ``session``; the future resolves to its :class:`StepResult` or SDK error."""
        out = make_output(
            output,
            top_k=top_k,
            logits=logits,
            argmax=argmax,
            probs=probs,
            sample=sample,
            all_positions=all_positions,
            none=none,
        )
        part = to_step_input(inputs)
        if session._stale:
            session.info()
        session._check_open()
        if self._core.closed:
            raise ValueError("stream is closed")
        self._slots.acquire()
        future: Future[StepResult] = Future()
        future.add_done_callback(lambda _: self._slots.release())
        try:
            with self._lock:
                self._ensure_call()
                ready = self._core.submit(session, part, out, future)
                if ready is not None:
                    self._send(ready)
        except Exception as exc:  # a closed stream, or the client's channel was closed
            future.set_exception(exc)  # frees the window slot
            raise
        return future

    def step(
        self,
        session: Session,
        inputs: Inputs,
        output: Output | None = None,
        *,
        top_k: int = 0,
        logits: bool = False,
        argmax: bool = False,
        probs: bool = False,
        sample: Sampling | None = None,
        all_positions: bool = False,
        none: bool = False,
    ) -> StepResult:
        """Submit one step and wait for its result."""
        return self.submit(
            session,
            inputs,
            output,
            top_k=top_k,
            logits=logits,
            argmax=argmax,
            probs=probs,
            sample=sample,
            all_positions=all_positions,
            none=none,
        ).result()

    @property
    def outstanding(self) -> int:
        """Steps submitted and not yet answered."""
        with self._lock:
            return self._core.outstanding

    def close(self, cancel: bool = False, timeout: float | None = None) -> None:
        """End the stream. First wait (up to ``timeout`` s, default no limit) for the outstanding steps;
        ``cancel=True`` fails them at once instead. Steps still outstanding fail with :class:`Cancelled`."""
        with self._lock:
            dropped = self._core.close(cancel)
            if not cancel and not self._changed.wait_for(lambda: self._core.outstanding == 0, timeout):
                dropped = self._core.give_up()
            reader, call = self._reader, self._call
            if self._sendq is not None:
                self._sendq.put(_END)
        self._fail(dropped)
        if call is not None and dropped:
            call.cancel()  # answers to the failed steps are not wanted
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout=5.0)
            if reader.is_alive() and call is not None:
                call.cancel()
                reader.join(timeout=5.0)

    def __enter__(self) -> StepStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(cancel=exc_type is not None)

    # -- transport -----------------------------------------------------------------------------
    def _send(self, item: MuxItem) -> None:
        assert self._sendq is not None
        self._sendq.put(item)

    def _open_locked(self) -> None:
        """Start a new StepStream call (lock held)."""
        client = self._client
        self._sendq = queue.Queue()
        timeout, metadata = client.config.stream_timeout, client.config.metadata()
        if self.packed:
            stub = client._stub.PackedStepStream
            self._call = stub(_packed_requests(self._sendq), timeout=timeout, metadata=metadata)
        else:
            self._call = client._stub.StepStream(_requests(self._sendq), timeout=timeout, metadata=metadata)

    def _ensure_call(self) -> None:
        if self._call is None:
            self._open_locked()
            self._reader = threading.Thread(target=self._read_loop, name="seqserve-stepstream", daemon=True)
            self._reader.start()

    def _fail(self, items: list[MuxItem], error: BaseException | None = None) -> None:
        # Outside the lock: a future's callbacks run here.
        error = error or closed_error()
        for item in items:
            if not item.handle.done():
                item.handle.set_exception(error)
        if items:
            with self._lock:
                self._changed.notify_all()

    def _on_result(self, msg: pb.StepResult) -> None:
        with self._lock:
            answer = self._core.answer(msg)
            if answer is None:
                return
            if answer.ready is not None:
                self._send(answer.ready)
            self._changed.notify_all()
        settle(answer.item, answer.outcome)

    def _on_columns(self, block: pb.ResultColumns) -> None:
        with self._lock:
            answers = self._core.answer_columns(block)
            for answer in answers:
                if answer.ready is not None:
                    self._send(answer.ready)
            if answers:
                self._changed.notify_all()
        for answer in answers:
            settle(answer.item, answer.outcome)

    def _read_loop(self) -> None:
        while True:
            call = self._call
            assert call is not None
            failure: grpc.RpcError | None = None
            try:
                if self.packed:
                    for msg in call:
                        for result in msg.results:
                            self._on_result(result)
                        for block in msg.columns:
                            self._on_columns(block)
                else:
                    for msg in call:
                        self._on_result(msg)
            except grpc.RpcError as exc:
                failure = exc
            if self.packed and unimplemented(failure):
                # a server from before PackedStepStream: the same steps, one per StepStream message
                with self._lock:
                    self.packed = False
                    if self._reopen_locked():
                        continue
                    self._call, self._reader = None, None
                    self._changed.notify_all()
                    return
            with self._lock:
                end = self._core.ended(failure)
                if end.resend_after is None:
                    # Nothing (more) to resend: the next submit opens a fresh stream.
                    self._call, self._reader = None, None
                    self._changed.notify_all()
            if end.resend_after is None:
                self._fail(end.failed, end.error)
                return
            time.sleep(end.resend_after)
            with self._lock:
                if not self._reopen_locked():  # close() failed them meanwhile: nothing to resend
                    self._call, self._reader = None, None
                    return

    def _reopen_locked(self) -> bool:
        """End the current call's requests and resend the steps on the wire on a new call (lock
        held; False: none are outstanding, and no call is opened)."""
        if self._sendq is not None:
            self._sendq.put(_END)
        if self._core.outstanding == 0:
            return False
        self._open_locked()
        assert self._sendq is not None
        for item in self._core.on_wire():
            self._sendq.put(item)
        return True

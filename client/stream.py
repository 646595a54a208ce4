"""Blocking multiplexer: many sessions' steps over one StepStream, read on a background thread."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from seqserve.v1 import seqserve_pb2 as pb

from .errors import Cancelled, SeqServeError, Unavailable, error_from_rpc
from .messages import Inputs, to_step_input
from .mux_core import MuxBook, MuxItem, resolve_result
from .retry import is_retryable
from .session import Session
from .session_base import make_output
from .types import Output, Sampling, StepResult

if TYPE_CHECKING:
    from .client import Client

__all__ = ["StepStream"]

_END = None  # put on a request queue to half-close that call


def _requests(q: "queue.Queue[pb.StepRequest | None]") -> Iterator[pb.StepRequest]:
    while True:
        req = q.get()
        if req is _END:
            return
        yield req


class StepStream:
    """Steps of many sessions multiplexed over one bidirectional stream (see ``Client.stream``).

    ``submit`` returns a ``concurrent.futures.Future`` and blocks while ``window`` steps are
    already outstanding: memory stays bounded however fast callers submit. Steps of one session
    run in submission order; different sessions' steps overlap. If the stream drops, the steps on
    the wire are resent on a new stream (exactly-once, via their expected positions).

    ``submit`` may be called from many threads. Futures resolve on the stream's reader thread, so
    a future's done-callback must not call ``submit`` (it could wait for a slot only that thread frees).
    """

    def __init__(self, client: "Client", window: int):
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self._client = client
        self.window = window
        self._slots = threading.BoundedSemaphore(window)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._book = MuxBook()
        self._sendq: queue.Queue[pb.StepRequest | None] | None = None
        self._call: Any = None
        self._reader: threading.Thread | None = None
        self._closed = False

    # -- public API ----------------------------------------------------------------------------
    def submit(self, session: Session, inputs: Inputs, output: Output | None = None, *, top_k: int = 0,
               logits: bool = False, argmax: bool = False, probs: bool = False, sample: Sampling | None = None,
               all_positions: bool = False, none: bool = False) -> "Future[StepResult]":
        """Queue one step for ``session``; the future resolves to its :class:`StepResult` or SDK error."""
        out = make_output(output, top_k=top_k, logits=logits, argmax=argmax, probs=probs, sample=sample,
                          all_positions=all_positions, none=none)
        part = to_step_input(inputs)
        if session._stale:
            session.info()
        session._check_open()
        self._slots.acquire()
        future: Future[StepResult] = Future()
        future.add_done_callback(lambda _: self._slots.release())
        failure: BaseException | None = None
        with self._lock:
            try:
                if self._closed:
                    raise ValueError("stream is closed")
                self._ensure_call()
                ready = self._book.add(MuxItem(self._book.new_tag(), session, part, out, future))
                if ready is not None:
                    assert self._sendq is not None
                    self._sendq.put(ready.request)
            except Exception as exc:  # e.g. the client's channel was closed
                failure = exc
        if failure is not None:
            future.set_exception(failure)  # frees the window slot
            raise failure
        return future

    def step(self, session: Session, inputs: Inputs, output: Output | None = None, **kwargs: Any) -> StepResult:
        """Submit one step and wait for its result."""
        return self.submit(session, inputs, output, **kwargs).result()

    @property
    def outstanding(self) -> int:
        """Steps submitted and not yet answered."""
        with self._lock:
            return self._book.outstanding

    def close(self, cancel: bool = False, timeout: float | None = None) -> None:
        """Wait for outstanding steps, then end the stream. ``cancel=True`` fails them instead."""
        dropped: list[MuxItem] = []
        with self._lock:
            self._closed = True
            if cancel:
                dropped = self._drain_locked()
            else:
                self._changed.wait_for(lambda: self._book.outstanding == 0, timeout)
            reader, call = self._reader, self._call
            if self._sendq is not None:
                self._sendq.put(_END)
        self._fail(dropped, Cancelled("stream closed before the step was answered", grpc.StatusCode.CANCELLED))
        if call is not None and cancel:
            call.cancel()
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout=5.0)
            if reader.is_alive() and call is not None:
                call.cancel()
                reader.join(timeout=5.0)

    def __enter__(self) -> "StepStream":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(cancel=exc_type is not None)

    # -- transport -----------------------------------------------------------------------------
    def _open_locked(self) -> None:
        """Start a new StepStream call (lock held)."""
        client = self._client
        self._sendq = queue.Queue()
        self._call = client._stub.StepStream(_requests(self._sendq), timeout=client.config.stream_timeout,
                                             metadata=client.config.metadata())

    def _ensure_call(self) -> None:
        if self._call is None:
            self._open_locked()
            self._reader = threading.Thread(target=self._read_loop, name="seqserve-stepstream", daemon=True)
            self._reader.start()

    def _drain_locked(self) -> list[MuxItem]:
        items = self._book.drain()
        self._changed.notify_all()
        return items

    @staticmethod
    def _fail(items: list[MuxItem], error: SeqServeError) -> None:
        # Outside the lock: a future's callbacks run here.
        for item in items:
            if not item.handle.done():
                item.handle.set_exception(error)

    def _on_result(self, msg: pb.StepResult) -> None:
        with self._lock:
            item = self._book.pop(msg.tag)
        if item is None:
            return
        outcome = resolve_result(item, msg)
        with self._lock:
            ready = self._book.release(item.session.id)
            if ready is not None and self._sendq is not None:
                self._sendq.put(ready.request)
            self._changed.notify_all()
        if isinstance(outcome, SeqServeError):
            item.handle.set_exception(outcome)
        else:
            item.handle.set_result(outcome)

    def _read_loop(self) -> None:
        config = self._client.config
        attempt = 0
        while True:
            retryable, cause = True, None
            error: SeqServeError = Unavailable("the server ended the step stream", grpc.StatusCode.UNAVAILABLE)
            try:
                for msg in self._call:
                    attempt = 0
                    self._on_result(msg)
            except grpc.RpcError as exc:
                retryable, cause = is_retryable(exc), exc
                error = error_from_rpc(exc)
            give_up = not retryable or attempt >= config.max_retries
            with self._lock:
                idle = self._book.outstanding == 0
                if idle or give_up:
                    # Nothing (more) to resend: the next submit opens a fresh stream.
                    self._call, self._reader = None, None
                    failed = [] if idle else self._drain_locked()
                    self._changed.notify_all()
            if idle or give_up:
                error.__cause__ = cause
                self._fail(failed, error)
                return
            time.sleep(config.backoff(attempt))
            attempt += 1
            with self._lock:
                if self._sendq is not None:
                    self._sendq.put(_END)
                self._open_locked()
                for item in self._book.on_wire():
                    self._sendq.put(item.request)  # type: ignore[union-attr]

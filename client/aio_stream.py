"""Asyncio multiplexer: many sessions' steps over one StepStream, read by a background task."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from seqserve.v1 import seqserve_pb2 as pb

from .aio_session import AsyncSession
from .errors import Cancelled, SeqServeError, Unavailable, error_from_rpc
from .messages import Inputs, to_step_input
from .mux_core import MuxBook, MuxItem, resolve_result
from .retry import is_retryable
from .session_base import make_output
from .types import Output, Sampling, StepResult

if TYPE_CHECKING:
    from .aio_client import AsyncClient

__all__ = ["AsyncStepStream"]


async def _requests(q: "asyncio.Queue[pb.StepRequest | None]") -> AsyncIterator[pb.StepRequest]:
    while True:
        req = await q.get()
        if req is None:
            return
        yield req


class AsyncStepStream:
    """Asyncio twin of :class:`StepStream` (see ``AsyncClient.stream``).

    ``await submit(...)`` waits while ``window`` steps are outstanding and returns an
    ``asyncio.Future``; ``await step(...)`` returns the result. Run many sessions concurrently
    with ``asyncio.gather``; one stream carries them all.
    """

    def __init__(self, client: "AsyncClient", window: int):
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self._client = client
        self.window = window
        self._slots = asyncio.Semaphore(window)
        self._book = MuxBook()
        self._sendq: asyncio.Queue[pb.StepRequest | None] | None = None
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    async def submit(self, session: AsyncSession, inputs: Inputs, output: Output | None = None, *,
                     top_k: int = 0, logits: bool = False, argmax: bool = False, probs: bool = False,
                     sample: Sampling | None = None, all_positions: bool = False,
                     none: bool = False) -> "asyncio.Future[StepResult]":
        """Queue one step (waiting for a free slot); the future resolves to its result or SDK error."""
        out = make_output(output, top_k=top_k, logits=logits, argmax=argmax, probs=probs, sample=sample,
                          all_positions=all_positions, none=none)
        part = to_step_input(inputs)
        if session._stale:
            await session.info()
        session._check_open()
        if self._closed:
            raise ValueError("stream is closed")
        await self._slots.acquire()
        future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda _: self._slots.release())
        try:
            self._ensure_call()
        except Exception as exc:  # e.g. the client's channel was closed
            future.set_exception(exc)  # frees the window slot
            future.exception()  # retrieved: no "never retrieved" warning
            raise
        ready = self._book.add(MuxItem(self._book.new_tag(), session, part, out, future))
        self._idle.clear()
        if ready is not None:
            assert self._sendq is not None
            self._sendq.put_nowait(ready.request)
        return future

    async def step(self, session: AsyncSession, inputs: Inputs, output: Output | None = None,
                   **kwargs: Any) -> StepResult:
        """Submit one step and wait for its result."""
        return await (await self.submit(session, inputs, output, **kwargs))

    @property
    def outstanding(self) -> int:
        """Steps submitted and not yet answered."""
        return self._book.outstanding

    async def close(self, cancel: bool = False) -> None:
        """Wait for outstanding steps, then end the stream. ``cancel=True`` fails them instead."""
        self._closed = True
        if cancel:
            self._fail(self._book.drain(), Cancelled("stream closed before the step was answered",
                                                      grpc.StatusCode.CANCELLED))
        else:
            await self._idle.wait()
        if self._sendq is not None:
            self._sendq.put_nowait(None)
        reader, call = self._reader, self._call
        if call is not None and cancel:
            call.cancel()
        if reader is not None:
            try:
                await asyncio.wait_for(asyncio.shield(reader), timeout=5.0)
            except asyncio.TimeoutError:
                if call is not None:
                    call.cancel()
                reader.cancel()

    async def __aenter__(self) -> "AsyncStepStream":
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close(cancel=exc_type is not None)

    # -- transport -----------------------------------------------------------------------------
    def _open(self) -> None:
        client = self._client
        self._sendq = asyncio.Queue()
        self._call = client._stub.StepStream(_requests(self._sendq), timeout=client.config.stream_timeout,
                                             metadata=client.config.metadata())

    def _ensure_call(self) -> None:
        if self._call is None:
            self._open()
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    def _fail(self, items: list[MuxItem], error: SeqServeError) -> None:
        for item in items:
            if not item.handle.done():
                item.handle.set_exception(error)
        self._idle.set()

    def _on_result(self, msg: pb.StepResult) -> None:
        item = self._book.pop(msg.tag)
        if item is None:
            return
        outcome = resolve_result(item, msg)
        ready = self._book.release(item.session.id)
        if ready is not None and self._sendq is not None:
            self._sendq.put_nowait(ready.request)
        if not item.handle.done():
            if isinstance(outcome, SeqServeError):
                item.handle.set_exception(outcome)
            else:
                item.handle.set_result(outcome)
        if self._book.outstanding == 0:
            self._idle.set()

    async def _read_loop(self) -> None:
        config = self._client.config
        attempt = 0
        while True:
            retryable, cause = True, None
            error: SeqServeError = Unavailable("the server ended the step stream", grpc.StatusCode.UNAVAILABLE)
            try:
                async for msg in self._call:
                    attempt = 0
                    self._on_result(msg)
            except grpc.RpcError as exc:
                retryable, cause = is_retryable(exc), exc
                error = error_from_rpc(exc)
            idle = self._book.outstanding == 0
            if idle or not retryable or attempt >= config.max_retries:
                # Nothing (more) to resend: the next submit opens a fresh stream.
                self._call, self._reader = None, None
                error.__cause__ = cause
                self._fail([] if idle else self._book.drain(), error)
                return
            await asyncio.sleep(config.backoff(attempt))
            attempt += 1
            if self._sendq is not None:
                self._sendq.put_nowait(None)
            self._open()
            for item in self._book.on_wire():
                self._sendq.put_nowait(item.request)  # type: ignore[union-attr]

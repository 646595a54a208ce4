"""Asyncio multiplexer: many sessions' steps over one StepStream, read by a background task.

Written by hand (a task and asyncio queues have no token-for-token blocking twin), like stream.py;
all decisions are made by the shared :class:`~seqserve.client.mux_core.StreamCore`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from seqserve.v1 import seqserve_pb2 as pb

from .aio_session import AsyncSession
from .messages import Inputs, to_step_input
from .mux_core import PACKED_MARK, MuxItem, StreamCore, closed_error, packed_steps, settle, unimplemented
from .session_base import make_output
from .types import Output, Sampling, StepResult

if TYPE_CHECKING:
    from .aio_client import AsyncClient

__all__ = ["AsyncStepStream"]


class _Call(Protocol):
    def __aiter__(self) -> AsyncIterator[Any]: ...

    def cancel(self) -> bool: ...


async def _requests(q: asyncio.Queue[MuxItem | None]) -> AsyncIterator[pb.StepRequest]:
    while True:
        item = await q.get()
        if item is None:
            return
        yield item.step_request()


async def _packed_requests(q: asyncio.Queue[MuxItem | None], holder: list[Any]) -> AsyncIterator[pb.PackedSteps]:
    """Every step queued by the time the call asks for its next message goes into that message.

    Nothing is written before the server has said it serves PackedStepStream (its first metadata
    carries :data:`PACKED_MARK`): a server without it ends the call at once with UNIMPLEMENTED, and
    a message written while that status arrives makes grpc.aio report the call as INTERNAL instead,
    hiding why. The read loop then sees UNIMPLEMENTED and falls back to StepStream.
    """
    call = holder[0]
    try:
        metadata = await call.initial_metadata()
    except Exception:  # the call failed before the server said anything: the read loop reports why
        return
    if PACKED_MARK not in tuple(metadata or ()):
        return
    while True:
        item = await q.get()
        if item is None:
            return
        items = [item]
        while not q.empty():
            item = q.get_nowait()
            if item is None:
                yield packed_steps(items)
                return
            items.append(item)
        yield packed_steps(items)


class AsyncStepStream:
    """Steps of many sessions multiplexed over one bidirectional stream (see ``AsyncClient.stream``).

    ``await submit(...)`` waits while ``window`` steps are outstanding and returns an
    ``asyncio.Future``; ``await step(...)`` returns the result. Steps of one session run in
    submission order; different sessions' steps overlap (run them with ``asyncio.gather``). If the
    stream drops, the steps on the wire are resent on a new stream (exactly-once).

    ``packed`` (the default): the steps waiting to be sent leave together, as one PackedStepStream
    message, so many sessions stepping at once cost the server one message and share one model run.
    A server without PackedStepStream (UNIMPLEMENTED) gets the steps one per StepStream message.
    """

    def __init__(self, client: AsyncClient, window: int, packed: bool = True):
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self._client = client
        self.window = window
        self.packed = packed
        self._slots = asyncio.Semaphore(window)
        self._core = StreamCore(client.config)
        self._sendq: asyncio.Queue[MuxItem | None] | None = None
        self._call: _Call | None = None
        self._reader: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()  # set while nothing is outstanding
        self._idle.set()

    # -- public API ----------------------------------------------------------------------------
    async def submit(
        self,
        session: AsyncSession,
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
    ) -> asyncio.Future[StepResult]:
        """Queue one step (waiting for a free slot); the future resolves to its result or SDK error."""
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
            await session.info()
        session._check_open()
        if self._core.closed:
            raise ValueError("stream is closed")
        await self._slots.acquire()
        future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda _: self._slots.release())
        try:
            self._ensure_call()
            ready = self._core.submit(session, part, out, future)
        except Exception as exc:  # a closed stream, or the client's channel was closed
            future.set_exception(exc)  # frees the window slot
            future.exception()  # retrieved: no "never retrieved" warning
            raise
        self._idle.clear()
        if ready is not None:
            self._send(ready)
        return future

    async def step(
        self,
        session: AsyncSession,
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
        return await (
            await self.submit(
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
            )
        )

    @property
    def outstanding(self) -> int:
        """Steps submitted and not yet answered."""
        return self._core.outstanding

    async def close(self, cancel: bool = False, timeout: float | None = None) -> None:
        """End the stream. First wait (up to ``timeout`` s, default no limit) for the outstanding steps;
        ``cancel=True`` fails them at once instead. Steps still outstanding fail with :class:`Cancelled`."""
        dropped = self._core.close(cancel)
        if not cancel:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except asyncio.TimeoutError:
                dropped = self._core.give_up()
        self._fail(dropped)
        if self._sendq is not None:
            self._sendq.put_nowait(None)
        reader, call = self._reader, self._call
        if call is not None and dropped:
            call.cancel()  # answers to the failed steps are not wanted
        if reader is not None:
            try:
                await asyncio.wait_for(asyncio.shield(reader), timeout=5.0)
            except asyncio.TimeoutError:
                if call is not None:
                    call.cancel()
                reader.cancel()

    async def __aenter__(self) -> AsyncStepStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close(cancel=exc_type is not None)

    # -- transport -----------------------------------------------------------------------------
    def _send(self, item: MuxItem) -> None:
        assert self._sendq is not None
        self._sendq.put_nowait(item)

    def _open(self) -> None:
        client = self._client
        self._sendq = asyncio.Queue()
        holder: list[Any] = []
        timeout, metadata = client.config.stream_timeout, client.config.metadata()
        if self.packed:
            stub = client._stub.PackedStepStream
            self._call = stub(_packed_requests(self._sendq, holder), timeout=timeout, metadata=metadata)
        else:
            self._call = client._stub.StepStream(_requests(self._sendq), timeout=timeout, metadata=metadata)
        holder.append(self._call)

    def _ensure_call(self) -> None:
        if self._call is None:
            self._open()
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    def _fail(self, items: list[MuxItem], error: BaseException | None = None) -> None:
        error = error or closed_error()
        for item in items:
            if not item.handle.done():
                item.handle.set_exception(error)
        if self._core.outstanding == 0:
            self._idle.set()

    def _on_result(self, msg: pb.StepResult) -> None:
        answer = self._core.answer(msg)
        if answer is None:
            return
        if answer.ready is not None:
            self._send(answer.ready)
        settle(answer.item, answer.outcome)
        if self._core.outstanding == 0:
            self._idle.set()

    def _on_columns(self, block: pb.ResultColumns) -> None:
        for answer in self._core.answer_columns(block):
            if answer.ready is not None:
                self._send(answer.ready)
            settle(answer.item, answer.outcome)
        if self._core.outstanding == 0:
            self._idle.set()

    async def _read_loop(self) -> None:
        while True:
            call = self._call
            assert call is not None
            failure: grpc.RpcError | None = None
            try:
                if self.packed:
                    async for msg in call:
                        for result in msg.results:
                            self._on_result(result)
                        for block in msg.columns:
                            self._on_columns(block)
                else:
                    async for msg in call:
                        self._on_result(msg)
            except grpc.RpcError as exc:
                failure = exc
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # this task is being cancelled
                # close() cancelled the call (grpc.aio reports that so, not as an RpcError): it is
                # over with nothing outstanding, as if the server had ended it.
            if self.packed and unimplemented(failure):
                # a server from before PackedStepStream: the same steps, one per StepStream message
                self.packed = False
                if self._reopen():
                    continue
                self._call, self._reader = None, None
                return
            end = self._core.ended(failure)
            if end.resend_after is None:
                # Nothing (more) to resend: the next submit opens a fresh stream.
                self._call, self._reader = None, None
                self._fail(end.failed, end.error)
                return
            await asyncio.sleep(end.resend_after)
            if not self._reopen():  # close() failed them meanwhile: nothing to resend
                self._call, self._reader = None, None
                return

    def _reopen(self) -> bool:
        """End the current call's requests and resend the steps on the wire on a new call (False:
        none are outstanding, and no call is opened)."""
        if self._sendq is not None:
            self._sendq.put_nowait(None)
        if self._core.outstanding == 0:
            return False
        self._open()
        assert self._sendq is not None
        for item in self._core.on_wire():
            self._sendq.put_nowait(item)
        return True

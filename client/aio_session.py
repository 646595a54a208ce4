"""The session object returned by ``client.session()`` and ``client.attach()``, and its generations.

Both flavours come from one source: aio_session.py is written by hand and scripts/gen_sync_client.py
generates the blocking session.py from it (see aio_client.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING

import grpc
import numpy as np

from seqserve.v1 import seqserve_pb2 as pb

from ._aio_io import ChunkIterator, GenerateCall, sleep
from .errors import NotFound, SeqServeError, error_from_rpc
from .messages import (
    Inputs,
    StepInput,
    classification_from,
    finish_reason_name,
    generate_request,
    step_request,
    to_step_input,
)
from .retry import Resends
from .session_base import GenerationState, SessionBase, make_output
from .types import Classification, GenerateChunk, Output, Sampling, SessionInfo, StepResult

if TYPE_CHECKING:
    from .aio_client import AsyncClient

__all__ = ["AsyncSession", "AsyncGeneration", "AsyncChunkStream"]


class AsyncChunkStream(AsyncIterator[GenerateChunk]):
    """Token chunks of a generation as they arrive (``async for chunk in ...``).

    After the loop, ``finish_reason`` is ``"length"`` or ``"stop"`` and ``tokens`` holds every
    generated id. ``await aclose()`` (or leaving the loop early) cancels the call; the session then
    re-reads its position before its next call, since the server may have gone further than what arrived.
    """

    def __init__(self, chunks: ChunkIterator, state: GenerationState):
        self._chunks = chunks
        self._state = state
        self._done = False

    def __aiter__(self) -> AsyncChunkStream:
        return self

    async def __anext__(self) -> GenerateChunk:
        if self._done:
            raise StopAsyncIteration
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            self._done = True
            raise

    async def aclose(self) -> None:
        """Stop reading and cancel the call if it is still running."""
        self._done = True
        await self._chunks.aclose()

    def __del__(self) -> None:
        # Runs as soon as the caller drops the stream: an abandoned generator's own cleanup may come
        # later (asyncio defers it to the event loop), and the session must know before its next call.
        if not self._done:
            self._state.abandoned()

    @property
    def tokens(self) -> list[int]:
        """Every token id generated so far."""
        return self._state.tokens

    @property
    def finish_reason(self) -> str | None:
        """``"length"`` or ``"stop"`` once the generation ended, else ``None``."""
        return self._state.finish_reason


class AsyncGeneration(AsyncIterator[str]):
    """Text of a generation as it arrives (``async for piece in ...``), never a split character.

    After the loop, ``finish_reason`` is ``"length"`` or ``"stop"``, ``tokens`` holds every
    generated id and ``text`` the whole text. ``await aclose()`` (or leaving the loop early) cancels the call.
    """

    def __init__(self, chunks: AsyncChunkStream, state: GenerationState):
        self._chunks = chunks
        self._state = state
        self._done = False

    def __aiter__(self) -> AsyncGeneration:
        return self

    async def __anext__(self) -> str:
        while not self._done:
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                self._done = True
                tail = self._state.end_text()
                if tail:
                    return tail
                break
            text = self._state.text_of(chunk)
            if text:
                return text
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop reading and cancel the call if it is still running."""
        self._done = True
        await self._chunks.aclose()

    @property
    def tokens(self) -> list[int]:
        """Every token id generated so far."""
        return self._state.tokens

    @property
    def finish_reason(self) -> str | None:
        """``"length"`` or ``"stop"`` once the generation ended, else ``None``."""
        return self._state.finish_reason

    @property
    def text(self) -> str:
        """The text yielded so far."""
        return self._state.text


class AsyncSession(SessionBase):
    """One server-side session: state that carries over from step to step.

    Use it as a context manager to close it on exit (also when the block raises)::

        async with client.session("lm-lstm") as s:
            await s.feed("Hello")
            async for piece in s.generate(max_tokens=20):
                print(piece, end="")
    """

    def __init__(self, client: AsyncClient, info: SessionInfo, close_on_exit: bool = True):
        super().__init__(info, close_on_exit)
        self._client = client

    # -- lifecycle -----------------------------------------------------------------------------
    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._close_on_exit or self._closed:
            return
        try:
            await self.close()
        except SeqServeError:
            if exc_type is None:
                raise

    async def close(self) -> int:
        """Close the session on the server; returns the position it was closed at.

        Closing a session the server no longer has (expired, or closed by a resent call) is not an error.
        """
        if self._closed:
            return self._position
        try:
            position = await self._client.close_session(self.id)
        except NotFound:
            position = None
        self._closed = True
        return self._position if position is None else position

    async def info(self) -> SessionInfo:
        """Fetch the session from the server and refresh ``position``."""
        return self._refreshed(await self._client.get_session(self.id))

    async def reset(self) -> SessionInfo:
        """Return the session to the model's initial state (position 0) without closing it."""
        self._check_open()
        return self._refreshed(await self._client.reset_session(self.id))

    # -- steps ---------------------------------------------------------------------------------
    async def _step_part(self, part: StepInput, output: Output, timeout: float | None) -> StepResult:
        """One Step call. Right after an abandoned generation it first re-reads the position and
        waits out the server finishing that generation."""
        self._check_open()
        attempt = 0
        while True:
            if self._stale:
                await self.info()
            req = step_request(self.id, self._position, part, output)
            try:
                reply = await self._client._unary(self._client._stub.Step, req, timeout)
            except SeqServeError as exc:
                wait = self._should_settle(exc, attempt)
                if wait is None:
                    raise
                await sleep(wait)
                attempt += 1
                continue
            self._settle_until = 0.0
            result = StepResult.from_proto(reply)
            self._advance(result.position)
            return result

    async def step(
        self,
        inputs: Inputs,
        output: Output | None = None,
        *,
        top_k: int = 0,
        logits: bool = False,
        argmax: bool = False,
        probs: bool = False,
        sample: Sampling | None = None,
        all_positions: bool = False,
        timeout: float | None = None,
    ) -> StepResult:
        """Feed tokens (text, bytes, ids) or feature frames ``[n, dim]``; return the step's outputs.

        Exactly-once: the step carries the expected position, so a resend after a dropped
        connection returns the server's cached result instead of advancing twice.
        """
        out = make_output(
            output, top_k=top_k, logits=logits, argmax=argmax, probs=probs, sample=sample, all_positions=all_positions
        )
        return await self._step_part(to_step_input(inputs), out, timeout)

    async def feed(
        self,
        prompt: Inputs,
        output: Output | None = None,
        *,
        top_k: int = 0,
        logits: bool = False,
        argmax: bool = False,
        probs: bool = False,
        sample: Sampling | None = None,
        none: bool = False,
        timeout: float | None = None,
    ) -> StepResult | None:
        """Feed a prompt chunk (split into steps of ``config.max_step_tokens``).

        Returns the result for the last position, or ``None`` with ``none=True`` (fastest).
        """
        out = make_output(output, top_k=top_k, logits=logits, argmax=argmax, probs=probs, sample=sample, none=none)
        if out.all_positions:
            raise ValueError("feed returns the last position only; use step(..., all_positions=True)")
        parts = to_step_input(prompt).split(self._client.config.max_step_tokens)
        for part in parts[:-1]:
            await self._step_part(part, Output(none=True), timeout)
        result = await self._step_part(parts[-1], out, timeout)
        return None if out.none else result

    async def classify(self, inputs: Inputs, *, timeout: float | None = None) -> Classification:
        """Feed frames ``[n, dim]`` (feature models) or tokens/text and classify the last position."""
        self._check_open()
        labels = await self._client._labels(self.model, self.version)
        parts = to_step_input(inputs).split(self._client.config.max_step_tokens)
        for part in parts[:-1]:
            await self._step_part(part, Output(none=True), timeout)
        return classification_from(await self._step_part(parts[-1], Output(probs=True), timeout), labels)

    # -- generation ----------------------------------------------------------------------------
    def generate_tokens(
        self,
        prompt: Inputs | None = None,
        *,
        max_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 0.0,
        seed: int | None = None,
        stop: str | bytes | Sequence[str | bytes] | None = None,
        timeout: float | None = None,
    ) -> AsyncChunkStream:
        """Sample up to ``max_tokens`` on the server; iterate over the token chunks as they arrive."""
        state = GenerationState(self, decode=False)
        chunks = self._generate(prompt, max_tokens, Sampling(temperature, top_k, top_p, seed), stop, timeout, state)
        return AsyncChunkStream(chunks, state)

    def generate(
        self,
        prompt: Inputs | None = None,
        *,
        max_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 0.0,
        seed: int | None = None,
        stop: str | bytes | Sequence[str | bytes] | None = None,
        timeout: float | None = None,
    ) -> AsyncGeneration:
        """Like :meth:`generate_tokens` but yields decoded text (byte-level models): never a split character.

        The prompt (text or ids) is fed first in one batched prefill; without one, sampling starts
        from the distribution after the last consumed token.
        """
        state = GenerationState(self, decode=True)
        chunks = self._generate(prompt, max_tokens, Sampling(temperature, top_k, top_p, seed), stop, timeout, state)
        return AsyncGeneration(AsyncChunkStream(chunks, state), state)

    def _generate(
        self,
        prompt: Inputs | None,
        max_tokens: int,
        sampling: Sampling,
        stop: str | bytes | Sequence[str | bytes] | None,
        timeout: float | None,
        state: GenerationState,
    ) -> ChunkIterator:
        self._check_open()

        def build() -> pb.GenerateRequest:
            return generate_request(self.id, self._position, prompt, max_tokens, sampling, stop)

        build()  # bad options fail here, not at the first read
        return self._generate_stream(build, timeout, state)

    async def _generate_stream(
        self, build: Callable[[], pb.GenerateRequest], timeout: float | None, state: GenerationState
    ) -> ChunkIterator:
        client = self._client
        resends = Resends(client.config)
        settle_attempt = 0
        received = False
        try:
            while True:
                if self._stale:
                    await self.info()
                call: GenerateCall = client._stub.Generate(
                    build(), timeout=client._deadline(timeout, generate=True), metadata=client.config.metadata()
                )
                try:
                    async for msg in call:
                        received = True
                        self._settle_until = 0.0
                        yield state.take(
                            np.asarray(msg.tokens, dtype=np.int32), msg.position, finish_reason_name(msg.finish_reason)
                        )
                    return
                except grpc.RpcError as exc:
                    # A resend is safe only before anything arrived: the expected position then
                    # makes the server refuse (PositionMismatch) rather than generate twice.
                    delay = None if received else resends.delay(exc)
                    if delay is not None:
                        await sleep(delay)
                        continue
                    error = error_from_rpc(exc)
                    wait = None if received else self._should_settle(error, settle_attempt)
                    if wait is None:
                        state.refusal(error, received)
                        raise error from exc
                    await sleep(wait)
                    settle_attempt += 1
                finally:
                    call.cancel()
        finally:
            state.abandoned()

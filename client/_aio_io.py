"""The asyncio side of the SDK's I/O: the few things the blocking and asyncio clients do differently.

The asyncio client (aio_client.py, aio_session.py) is the one written source; the blocking client
is generated from it by scripts/gen_sync_client.py, which turns ``await``/``async`` into plain calls
and imports _sync_io.py, this module's blocking twin, in place of this one. Whatever cannot be
expressed by that token rewrite lives here and there: channels, sleeping, the stub's types, and
how ``client.session()`` hands out a session.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypeVar

import grpc

from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from .config import ClientConfig, aio_channel
from .types import GenerateChunk

if TYPE_CHECKING:
    from .aio_session import AsyncSession

__all__ = [
    "Channel",
    "Stub",
    "UnaryRpc",
    "GenerateCall",
    "ChunkIterator",
    "SessionOpener",
    "open_channel",
    "close_channel",
    "new_stub",
    "sleep",
    "open_session",
]

Req = TypeVar("Req")
Resp = TypeVar("Resp")

Channel: TypeAlias = grpc.aio.Channel
# What a generation's chunks come from: the session's generator of GenerateChunk.
ChunkIterator: TypeAlias = AsyncGenerator[GenerateChunk, None]
# A unary method of the stub, taking Req and answering Resp.
UnaryRpc: TypeAlias = "grpc.aio.UnaryUnaryMultiCallable[Req, Resp]"  # grpc is not subscriptable at run time


class GenerateCall(Protocol):
    """A running Generate call, as the session reads it."""

    def __aiter__(self) -> AsyncIterator[pb.GenerateResponse]: ...

    def cancel(self) -> bool: ...


class Stub(Protocol):
    """The generated SeqServe stub over an asyncio channel, with the types of its methods."""

    ListModels: grpc.aio.UnaryUnaryMultiCallable[pb.ListModelsRequest, pb.ListModelsResponse]
    CreateSession: grpc.aio.UnaryUnaryMultiCallable[pb.CreateSessionRequest, pb.SessionInfo]
    GetSession: grpc.aio.UnaryUnaryMultiCallable[pb.GetSessionRequest, pb.SessionInfo]
    CloseSession: grpc.aio.UnaryUnaryMultiCallable[pb.CloseSessionRequest, pb.CloseSessionResponse]
    ResetSession: grpc.aio.UnaryUnaryMultiCallable[pb.ResetSessionRequest, pb.SessionInfo]
    Step: grpc.aio.UnaryUnaryMultiCallable[pb.StepRequest, pb.StepResult]
    StepStream: grpc.aio.StreamStreamMultiCallable[pb.StepRequest, pb.StepResult]
    PackedStepStream: grpc.aio.StreamStreamMultiCallable[pb.PackedSteps, pb.PackedResults]
    Generate: grpc.aio.UnaryStreamMultiCallable[pb.GenerateRequest, pb.GenerateResponse]


def open_channel(target: str, config: ClientConfig) -> Channel:
    """A channel bound to the running event loop (so it is opened on first use, inside the loop)."""
    return aio_channel(target, config)


def new_stub(channel: Channel) -> Stub:
    # protoc's stub module has no annotations: this is where its methods get their types.
    stub: Stub = pb_grpc.SeqServeStub(channel)
    return stub


async def close_channel(channel: Channel) -> None:
    await channel.close(grace=None)


async def sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


class SessionOpener:
    """What :meth:`AsyncClient.session` returns: ``await`` it for a session, or ``async with`` it
    to create the session on entry and close it on exit (also when the block raises)."""

    def __init__(self, creating: Coroutine[Any, Any, AsyncSession]):
        self._creating = creating
        self._session: AsyncSession | None = None

    def __await__(self) -> Generator[Any, None, AsyncSession]:
        return self._creating.__await__()

    async def __aenter__(self) -> AsyncSession:
        self._session = await self._creating
        return self._session

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.__aexit__(exc_type, exc, tb)


def open_session(creating: Coroutine[Any, Any, AsyncSession]) -> SessionOpener:
    """``client.session(...)``: the creation, run when awaited or entered (the blocking twin runs it now)."""
    return SessionOpener(creating)

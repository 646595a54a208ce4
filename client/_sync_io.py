"""The blocking side of the SDK's I/O: the twin of _aio_io.py (see there), used by the generated client."""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Protocol, TypeAlias, TypeVar

import grpc

from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from .config import ClientConfig, sync_channel
from .types import GenerateChunk

if TYPE_CHECKING:
    # The asyncio client's ``session()`` returns a SessionOpener from _aio_io; the generator renames
    # that to Session, found here. Only the type checker looks: a blocking ``session()`` hands out
    # the Session it made, so no class is needed at run time (and importing session.py here would
    # be circular).
    from .session import Session as Session

__all__ = [
    "Channel",
    "Stub",
    "UnaryRpc",
    "GenerateCall",
    "ChunkIterator",
    "open_channel",
    "close_channel",
    "new_stub",
    "sleep",
    "open_session",
]

Req = TypeVar("Req")
Resp = TypeVar("Resp")

Channel: TypeAlias = grpc.Channel
ChunkIterator: TypeAlias = Generator[GenerateChunk, None, None]
# A unary method of the stub, taking Req and answering Resp.
UnaryRpc: TypeAlias = "grpc.UnaryUnaryMultiCallable[Req, Resp]"  # grpc is not subscriptable at run time


class GenerateCall(Protocol):
    """A running Generate call, as the session reads it."""

    def __iter__(self) -> Iterator[pb.GenerateResponse]: ...

    def cancel(self) -> bool: ...


class Stub(Protocol):
    """The generated SeqServe stub over a blocking channel, with the types of its methods."""

    ListModels: grpc.UnaryUnaryMultiCallable[pb.ListModelsRequest, pb.ListModelsResponse]
    CreateSession: grpc.UnaryUnaryMultiCallable[pb.CreateSessionRequest, pb.SessionInfo]
    GetSession: grpc.UnaryUnaryMultiCallable[pb.GetSessionRequest, pb.SessionInfo]
    CloseSession: grpc.UnaryUnaryMultiCallable[pb.CloseSessionRequest, pb.CloseSessionResponse]
    ResetSession: grpc.UnaryUnaryMultiCallable[pb.ResetSessionRequest, pb.SessionInfo]
    Step: grpc.UnaryUnaryMultiCallable[pb.StepRequest, pb.StepResult]
    StepStream: grpc.StreamStreamMultiCallable[pb.StepRequest, pb.StepResult]
    PackedStepStream: grpc.StreamStreamMultiCallable[pb.PackedSteps, pb.PackedResults]
    Generate: grpc.UnaryStreamMultiCallable[pb.GenerateRequest, pb.GenerateResponse]


def open_channel(target: str, config: ClientConfig) -> Channel:
    return sync_channel(target, config)


def new_stub(channel: Channel) -> Stub:
    # protoc's stub module has no annotations: this is where its methods get their types.
    stub: Stub = pb_grpc.SeqServeStub(channel)
    return stub


def close_channel(channel: Channel) -> None:
    channel.close()


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def open_session(session: Session) -> Session:
    """``client.session(...)``: the session was created by the call itself; hand it over."""
    return session

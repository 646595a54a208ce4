"""seqserve's Python SDK: blocking and asyncio clients for a seqserve server.

Needs only grpcio, protobuf and numpy. Quick start::

    from seqserve.client import Client

    with Client("127.0.0.1:50051") as client, client.session("lm-lstm") as s:
        for piece in s.generate("Once upon a time", max_tokens=40, seed=1):
            print(piece, end="", flush=True)

The blocking client (client.py, session.py) is generated from the asyncio one (aio_client.py,
aio_session.py) by scripts/gen_sync_client.py. See docs/client.md for the full guide.
"""

from ._aio_io import SessionOpener
from .aio_client import AsyncClient
from .aio_session import AsyncChunkStream, AsyncGeneration, AsyncSession
from .aio_stream import AsyncStepStream
from .client import Client
from .config import DEFAULT_TARGET, ClientConfig, TlsConfig, default_target
from .errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidInput,
    ModelNotFound,
    NotFound,
    Overloaded,
    PermissionDenied,
    PositionMismatch,
    SeqServeError,
    SessionExpired,
    SessionNotFound,
    Unauthenticated,
    Unavailable,
)
from .messages import Inputs
from .session import ChunkStream, Generation, Session
from .stream import StepStream
from .text import Utf8StreamDecoder, as_stop_bytes, decode_tokens, encode_text
from .types import Classification, GenerateChunk, ModelInfo, Output, Sampling, SessionInfo, StepResult

__all__ = [
    "Client",
    "AsyncClient",
    "Session",
    "AsyncSession",
    "SessionOpener",
    "Generation",
    "AsyncGeneration",
    "ChunkStream",
    "AsyncChunkStream",
    "StepStream",
    "AsyncStepStream",
    "ClientConfig",
    "TlsConfig",
    "DEFAULT_TARGET",
    "default_target",
    "Inputs",
    "Output",
    "Sampling",
    "ModelInfo",
    "SessionInfo",
    "StepResult",
    "GenerateChunk",
    "Classification",
    "encode_text",
    "decode_tokens",
    "as_stop_bytes",
    "Utf8StreamDecoder",
    "SeqServeError",
    "NotFound",
    "SessionNotFound",
    "SessionExpired",
    "ModelNotFound",
    "AlreadyExists",
    "FailedPrecondition",
    "PositionMismatch",
    "InvalidInput",
    "Overloaded",
    "Unauthenticated",
    "PermissionDenied",
    "Unavailable",
    "DeadlineExceeded",
    "Cancelled",
]

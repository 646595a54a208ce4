"""The asyncio client: the same surface as :class:`Client`, awaited."""

from __future__ import annotations

from collections.abc import Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from .aio_session import AsyncSession
from .client import _config_from
from .config import ClientConfig, TlsConfig, aio_channel, default_target
from .errors import AlreadyExists, ModelNotFound, NotFound, SeqServeError
from .retry import call_with_retry_async
from .types import ModelInfo, SessionInfo

if TYPE_CHECKING:
    from .aio_stream import AsyncStepStream

__all__ = ["AsyncClient", "SessionOpener"]


class SessionOpener:
    """What :meth:`AsyncClient.session` returns: ``await`` it for a session, or ``async with`` it
    to create the session on entry and close it on exit (also when the block raises)."""

    def __init__(self, client: "AsyncClient", model: str, version: int, session_id: str | None,
                 timeout: float | None):
        self._client = client
        self._args = (model, version, session_id, timeout)
        self._session: AsyncSession | None = None

    def __await__(self) -> Generator[Any, None, AsyncSession]:
        return self._client._create(*self._args).__await__()

    async def __aenter__(self) -> AsyncSession:
        self._session = await self._client._create(*self._args)
        return self._session

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.__aexit__(exc_type, exc, tb)


class AsyncClient:
    """Asyncio client for a seqserve server; arguments as for :class:`Client`.

    The channel is opened on first use inside the running event loop; close it with
    ``async with AsyncClient(...) as client:`` or ``await client.close()``.
    """

    def __init__(self, target: str | None = None, *, config: ClientConfig | None = None, token: str | None = None,
                 tls: TlsConfig | bool | None = None, timeout: float | None = None,
                 max_retries: int | None = None):
        self.target = target or default_target()
        self.config = _config_from(config, token, tls, timeout, max_retries)
        if self.config.tls is not None:
            self.config.tls.credentials()  # fail now, not at first call, on unreadable certificates
        self._channel: grpc.aio.Channel | None = None
        self._stub_obj: pb_grpc.SeqServeStub | None = None
        self._model_cache: dict[tuple[str, int], ModelInfo] = {}

    @property
    def _stub(self) -> pb_grpc.SeqServeStub:
        if self._stub_obj is None:
            self._channel = aio_channel(self.target, self.config)
            self._stub_obj = pb_grpc.SeqServeStub(self._channel)
        return self._stub_obj

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel. Sessions stay on the server until closed or expired."""
        if self._channel is not None:
            await self._channel.close(grace=None)
            self._channel, self._stub_obj = None, None

    def _deadline(self, timeout: float | None, generate: bool = False) -> float | None:
        if timeout is not None:
            return timeout
        return self.config.generate_timeout if generate else self.config.timeout

    async def _unary(self, method: str, request: Any,
                     timeout: float | None = None, recover: Any = None) -> Any:
        rpc = getattr(self._stub, method)
        deadline = self._deadline(timeout)
        metadata = self.config.metadata()
        return await call_with_retry_async(lambda: rpc(request, timeout=deadline, metadata=metadata),
                                           self.config, recover)

    # -- models --------------------------------------------------------------------------------
    async def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model the server serves."""
        reply = await self._unary("ListModels", pb.ListModelsRequest(), timeout)
        models = [ModelInfo.from_proto(m) for m in reply.models]
        for m in models:
            self._model_cache[(m.name, m.version)] = m
        return models

    async def model(self, name: str, version: int = 0) -> ModelInfo:
        """One model's facts (``version`` 0: the latest). Raises :class:`ModelNotFound`."""
        for m in await self.models():
            if m.name == name and (version in (0, m.version) or version in m.versions):
                return m
        raise ModelNotFound(f"model {name!r} is not served" + (f" in version {version}" if version else ""),
                            grpc.StatusCode.NOT_FOUND)

    async def _labels(self, name: str, version: int) -> tuple[str, ...]:
        info = self._model_cache.get((name, version)) or await self.model(name, version)
        return info.labels

    # -- sessions ------------------------------------------------------------------------------
    def session(self, model: str, *, version: int = 0, session_id: str | None = None,
                timeout: float | None = None) -> SessionOpener:
        """Create a session: ``s = await client.session(m)`` or ``async with client.session(m) as s:``."""
        return SessionOpener(self, model, version, session_id, timeout)

    async def _create(self, model: str, version: int, session_id: str | None,
                      timeout: float | None) -> AsyncSession:
        req = pb.CreateSessionRequest(model=model, version=version, session_id=session_id or "")

        async def recover(error: SeqServeError, attempt: int) -> Any:
            if isinstance(error, AlreadyExists) and session_id:
                return await self._unary("GetSession", pb.GetSessionRequest(session_id=session_id),
                                         timeout)
            return None

        reply = await self._unary("CreateSession", req, timeout, recover)
        return AsyncSession(self, SessionInfo.from_proto(reply))

    async def attach(self, session_id: str, *, close_on_exit: bool = False,
                     timeout: float | None = None) -> AsyncSession:
        """An :class:`AsyncSession` for an existing session id (position read from the server)."""
        return AsyncSession(self, await self.get_session(session_id, timeout=timeout), close_on_exit=close_on_exit)

    async def get_session(self, session_id: str, *, timeout: float | None = None) -> SessionInfo:
        """The server's view of a session. Raises :class:`SessionNotFound` / :class:`SessionExpired`."""
        reply = await self._unary("GetSession", pb.GetSessionRequest(session_id=session_id), timeout)
        return SessionInfo.from_proto(reply)

    async def reset_session(self, session_id: str, *, timeout: float | None = None) -> SessionInfo:
        """Return a session to position 0 without closing it."""
        reply = await self._unary("ResetSession", pb.ResetSessionRequest(session_id=session_id),
                                  timeout)
        return SessionInfo.from_proto(reply)

    async def close_session(self, session_id: str, *, timeout: float | None = None) -> int | None:
        """Close a session; returns its final position (``None`` if a resend found it already closed)."""
        already_closed = object()

        async def recover(error: SeqServeError, attempt: int) -> Any:
            return already_closed if isinstance(error, NotFound) else None

        reply = await self._unary("CloseSession", pb.CloseSessionRequest(session_id=session_id),
                                  timeout, recover)
        return None if reply is already_closed else int(reply.position)

    def stream(self, window: int | None = None) -> "AsyncStepStream":
        """An :class:`AsyncStepStream` multiplexing many sessions over one StepStream call."""
        from .aio_stream import AsyncStepStream

        return AsyncStepStream(self, window or self.config.stream_window)

"""The client: one gRPC channel to a seqserve server, and the calls that need no session object.

Both flavours come from one source: aio_client.py is written by hand and scripts/gen_sync_client.py
generates the blocking client.py from it. I/O that differs between them goes through _aio_io.py
and its blocking twin _sync_io.py.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

import grpc

from seqserve.v1 import seqserve_pb2 as pb

from ._aio_io import Channel, Stub, UnaryRpc, close_channel, new_stub, open_channel, open_session, sleep
from .aio_session import AsyncSession
from .config import ClientConfig, TlsConfig, default_target, resolve_tls
from .errors import AlreadyExists, ModelNotFound, NotFound, SeqServeError, error_from_rpc
from .retry import Resends
from .types import ModelInfo, SessionInfo

if TYPE_CHECKING:
    from ._aio_io import SessionOpener
    from .aio_stream import AsyncStepStream

__all__ = ["AsyncClient"]

Req = TypeVar("Req")
Resp = TypeVar("Resp")


def _config_from(
    config: ClientConfig | None,
    token: str | None,
    tls: TlsConfig | bool | None,
    timeout: float | None,
    max_retries: int | None,
) -> ClientConfig:
    base = config or ClientConfig()
    return base.with_overrides(
        token=token, tls=resolve_tls(tls) if tls is not None else None, timeout=timeout, max_retries=max_retries
    )


class AsyncClient:
    """A client of a seqserve server.

    ``target`` is ``host:port`` (default ``$SEQSERVE_TARGET`` or ``127.0.0.1:50051``). Keyword
    arguments override the matching :class:`ClientConfig` fields. The channel is opened on first
    use; close it by leaving the ``async with`` block (or with ``await client.close()``)::

        async with AsyncClient("127.0.0.1:50051") as client:
            print([m.name for m in await client.models()])

    A client may be shared (by threads or tasks); once closed, its calls raise ``ValueError``.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        config: ClientConfig | None = None,
        token: str | None = None,
        tls: TlsConfig | bool | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
    ):
        self.target = target or default_target()
        self.config = _config_from(config, token, tls, timeout, max_retries)
        if self.config.tls is not None:
            self.config.tls.credentials()  # fail now, not at the first call, on unreadable certificates
        # The channel is made on first use: an asyncio channel belongs to the event loop it is made
        # in. The lock keeps threads sharing a blocking client from making two.
        self._lock = threading.Lock()
        self._channel: Channel | None = None
        self._stub_obj: Stub | None = None
        self._closed = False
        self._model_cache: dict[tuple[str, int], ModelInfo] = {}

    # -- plumbing ------------------------------------------------------------------------------
    @property
    def _stub(self) -> Stub:
        with self._lock:
            if self._closed:
                raise ValueError("client is closed")
            if self._stub_obj is None:
                self._channel = open_channel(self.target, self.config)
                self._stub_obj = new_stub(self._channel)
            return self._stub_obj

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel. Sessions stay on the server until closed or expired."""
        with self._lock:
            channel, self._channel, self._stub_obj = self._channel, None, None
            self._closed = True
        if channel is not None:
            await close_channel(channel)

    def _deadline(self, timeout: float | None, generate: bool = False) -> float | None:
        if timeout is not None:
            return timeout
        return self.config.generate_timeout if generate else self.config.timeout

    async def _call(
        self,
        rpc: UnaryRpc[Req, Resp],
        request: Req,
        timeout: float | None,
        lost_reply: type[SeqServeError] | None = None,
    ) -> Resp | None:
        """One unary call, resent after UNAVAILABLE; failures raised as SDK errors.

        ``lost_reply``: an error that, on a resend, means the first send did reach the server and
        only its reply was lost; the call then returns ``None`` instead of raising it.
        """
        deadline = self._deadline(timeout)
        metadata = self.config.metadata()
        resends = Resends(self.config)
        while True:
            try:
                return await rpc(request, timeout=deadline, metadata=metadata)
            except grpc.RpcError as exc:
                delay = resends.delay(exc)
                if delay is None:
                    error = error_from_rpc(exc)
                    if lost_reply is not None and resends.count and isinstance(error, lost_reply):
                        return None
                    raise error from exc
                await sleep(delay)

    async def _unary(self, rpc: UnaryRpc[Req, Resp], request: Req, timeout: float | None = None) -> Resp:
        reply = await self._call(rpc, request, timeout)
        assert reply is not None  # only a lost reply makes it None, and none was allowed for
        return reply

    # -- models --------------------------------------------------------------------------------
    async def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model the server serves (latest version of each name, with all versions listed)."""
        reply = await self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        models = [ModelInfo.from_proto(m) for m in reply.models]
        for m in models:
            self._model_cache[(m.name, m.version)] = m
        return models

    async def model(self, name: str, version: int = 0) -> ModelInfo:
        """One model's facts (``version`` 0: the latest). Raises :class:`ModelNotFound`.

        The server lists the latest version of each name; an older version gets those facts too.
        """
        for m in await self.models():
            if m.name == name and (version in (0, m.version) or version in m.versions):
                return m
        raise ModelNotFound(
            f"model {name!r} is not served" + (f" in version {version}" if version else ""),
            grpc.StatusCode.NOT_FOUND,
            reason="MODEL_NOT_FOUND",
            metadata={"model": name},
        )

    async def _labels(self, name: str, version: int) -> tuple[str, ...]:
        info = self._model_cache.get((name, version)) or await self.model(name, version)
        return info.labels

    # -- sessions ------------------------------------------------------------------------------
    def session(
        self, model: str, *, version: int = 0, session_id: str | None = None, timeout: float | None = None
    ) -> SessionOpener:
        """Create a session on ``model`` (latest version unless ``version``).

        ``s = await client.session(m)``, or ``async with client.session(m) as s:`` to close it when
        the block ends (also when it raises). Raises :class:`ModelNotFound` for an unknown model,
        :class:`AlreadyExists` for a taken ``session_id``.
        """
        return open_session(self._create(model, version, session_id, timeout))

    async def _create(self, model: str, version: int, session_id: str | None, timeout: float | None) -> AsyncSession:
        req = pb.CreateSessionRequest(model=model, version=version, session_id=session_id or "")
        # With our own id, a resend answered "already exists" means the first send created it and
        # its reply was lost: the session is ours. (A server-chosen id cannot be recovered so.)
        reply = await self._call(
            self._stub.CreateSession, req, timeout, lost_reply=AlreadyExists if session_id else None
        )
        if reply is None:
            reply = await self._unary(self._stub.GetSession, pb.GetSessionRequest(session_id=session_id), timeout)
        return AsyncSession(self, SessionInfo.from_proto(reply))

    async def attach(
        self, session_id: str, *, close_on_exit: bool = False, timeout: float | None = None
    ) -> AsyncSession:
        """A session object for an existing session id (position read from the server).

        Leaving the ``async with`` block closes it only with ``close_on_exit=True``.
        """
        return AsyncSession(self, await self.get_session(session_id, timeout=timeout), close_on_exit=close_on_exit)

    async def get_session(self, session_id: str, *, timeout: float | None = None) -> SessionInfo:
        """The server's view of a session. Raises :class:`SessionNotFound` / :class:`SessionExpired`."""
        reply = await self._unary(self._stub.GetSession, pb.GetSessionRequest(session_id=session_id), timeout)
        return SessionInfo.from_proto(reply)

    async def reset_session(self, session_id: str, *, timeout: float | None = None) -> SessionInfo:
        """Return a session to position 0 without closing it."""
        reply = await self._unary(self._stub.ResetSession, pb.ResetSessionRequest(session_id=session_id), timeout)
        return SessionInfo.from_proto(reply)

    async def close_session(self, session_id: str, *, timeout: float | None = None) -> int | None:
        """Close a session; returns its final position (``None`` if a resend found it already closed)."""
        # A resend that finds the session gone: the first send closed it and its reply was lost.
        reply = await self._call(
            self._stub.CloseSession, pb.CloseSessionRequest(session_id=session_id), timeout, lost_reply=NotFound
        )
        return None if reply is None else int(reply.position)

    # -- streaming -----------------------------------------------------------------------------
    def stream(self, window: int | None = None, *, packed: bool = True) -> AsyncStepStream:
        """A step stream multiplexing many sessions' steps over one call.

        At most ``window`` steps (default ``config.stream_window``) are in flight; ``submit``
        waits beyond that. ``packed`` (default): steps waiting to be sent travel together in one
        PackedStepStream message (one StepStream message each with ``packed=False``, or when the
        server has no PackedStepStream).
        """
        from .aio_stream import AsyncStepStream

        return AsyncStepStream(self, window or self.config.stream_window, packed)

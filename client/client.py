"""The blocking client: one gRPC channel to a seqserve server."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from .config import ClientConfig, TlsConfig, default_target, resolve_tls, sync_channel
from .errors import AlreadyExists, ModelNotFound, NotFound, SeqServeError
from .retry import call_with_retry
from .session import Session
from .types import ModelInfo, SessionInfo

if TYPE_CHECKING:
    from .stream import StepStream

__all__ = ["Client"]


def _config_from(config: ClientConfig | None, token: str | None, tls: TlsConfig | bool | None,
                 timeout: float | None, max_retries: int | None) -> ClientConfig:
    base = config or ClientConfig()
    return base.with_overrides(token=token, tls=resolve_tls(tls) if tls is not None else None,
                               timeout=timeout, max_retries=max_retries)


class Client:
    """Blocking client for a seqserve server.

    ``target`` is ``host:port`` (default ``$SEQSERVE_TARGET`` or ``127.0.0.1:50051``). Keyword
    arguments override the matching :class:`ClientConfig` fields. Use it as a context manager to
    close the channel::

        with Client("127.0.0.1:50051") as client:
            print([m.name for m in client.models()])
    """

    def __init__(self, target: str | None = None, *, config: ClientConfig | None = None, token: str | None = None,
                 tls: TlsConfig | bool | None = None, timeout: float | None = None,
                 max_retries: int | None = None):
        self.target = target or default_target()
        self.config = _config_from(config, token, tls, timeout, max_retries)
        self._channel = sync_channel(self.target, self.config)
        self._stub = pb_grpc.SeqServeStub(self._channel)
        self._model_cache: dict[tuple[str, int], ModelInfo] = {}

    # -- plumbing ------------------------------------------------------------------------------
    def __enter__(self) -> "Client":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel. Sessions stay on the server until closed or expired."""
        self._channel.close()

    def _deadline(self, timeout: float | None, generate: bool = False) -> float | None:
        if timeout is not None:
            return timeout
        return self.config.generate_timeout if generate else self.config.timeout

    def _unary(self, method: str, request: Any,
               timeout: float | None = None, recover: Any = None) -> Any:
        rpc = getattr(self._stub, method)
        deadline = self._deadline(timeout)
        metadata = self.config.metadata()
        return call_with_retry(lambda: rpc(request, timeout=deadline, metadata=metadata), self.config, recover)

    # -- models --------------------------------------------------------------------------------
    def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model the server serves (latest version of each name, with all versions listed)."""
        reply = self._unary("ListModels", pb.ListModelsRequest(), timeout)
        models = [ModelInfo.from_proto(m) for m in reply.models]
        for m in models:
            self._model_cache[(m.name, m.version)] = m
        return models

    def model(self, name: str, version: int = 0) -> ModelInfo:
        """One model's facts (``version`` 0: the latest). Raises :class:`ModelNotFound`.

        The server lists the latest version of each name; an older version gets those facts too.
        """
        for m in self.models():
            if m.name == name and (version in (0, m.version) or version in m.versions):
                return m
        raise ModelNotFound(f"model {name!r} is not served" + (f" in version {version}" if version else ""),
                            grpc.StatusCode.NOT_FOUND)

    def _labels(self, name: str, version: int) -> tuple[str, ...]:
        info = self._model_cache.get((name, version)) or self.model(name, version)
        return info.labels

    # -- sessions ------------------------------------------------------------------------------
    def session(self, model: str, *, version: int = 0, session_id: str | None = None,
                timeout: float | None = None) -> Session:
        """Create a session on ``model`` (latest version unless ``version``); close it with ``with``.

        Raises :class:`ModelNotFound` for an unknown model, :class:`AlreadyExists` for a taken id.
        """
        req = pb.CreateSessionRequest(model=model, version=version, session_id=session_id or "")

        def recover(error: SeqServeError, attempt: int) -> Any:
            # Our first send created it but the reply was lost: the session is ours.
            if isinstance(error, AlreadyExists) and session_id:
                return self._unary("GetSession", pb.GetSessionRequest(session_id=session_id), timeout)
            return None

        reply = self._unary("CreateSession", req, timeout, recover)
        return Session(self, SessionInfo.from_proto(reply))

    def attach(self, session_id: str, *, close_on_exit: bool = False, timeout: float | None = None) -> Session:
        """A :class:`Session` for an existing session id (position read from the server).

        Leaving a ``with`` block closes it only with ``close_on_exit=True``.
        """
        return Session(self, self.get_session(session_id, timeout=timeout), close_on_exit=close_on_exit)

    def get_session(self, session_id: str, *, timeout: float | None = None) -> SessionInfo:
        """The server's view of a session. Raises :class:`SessionNotFound` / :class:`SessionExpired`."""
        reply = self._unary("GetSession", pb.GetSessionRequest(session_id=session_id), timeout)
        return SessionInfo.from_proto(reply)

    def reset_session(self, session_id: str, *, timeout: float | None = None) -> SessionInfo:
        """Return a session to position 0 without closing it."""
        reply = self._unary("ResetSession", pb.ResetSessionRequest(session_id=session_id), timeout)
        return SessionInfo.from_proto(reply)

    def close_session(self, session_id: str, *, timeout: float | None = None) -> int | None:
        """Close a session; returns its final position (``None`` if a resend found it already closed)."""

        already_closed = object()

        def recover(error: SeqServeError, attempt: int) -> Any:
            # A resend found it gone: the first send closed it and its reply was lost.
            return already_closed if isinstance(error, NotFound) else None

        reply = self._unary("CloseSession", pb.CloseSessionRequest(session_id=session_id), timeout,
                            recover)
        return None if reply is already_closed else int(reply.position)

    # -- streaming -----------------------------------------------------------------------------
    def stream(self, window: int | None = None) -> "StepStream":
        """A :class:`StepStream` multiplexing many sessions' steps over one StepStream call.

        At most ``window`` steps (default ``config.stream_window``) are in flight; ``submit``
        blocks beyond that.
        """
        from .stream import StepStream

        return StepStream(self, window or self.config.stream_window)

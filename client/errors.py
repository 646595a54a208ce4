"""The SDK's exceptions: one class per thing a caller may want to handle differently.

Every gRPC failure surfaces as a :class:`SeqServeError` subclass. The class is chosen by the
server's stable ``reason`` (a ``google.rpc.ErrorInfo`` of domain ``seqserve`` in the call's rich
status, or a StepResult's ``error.reason`` on a stream), never by the message text: messages are
for people and may be reworded. Without a reason (transport failures, an older server) only the
status code decides.

The raw status stays reachable: ``.code`` (a ``grpc.StatusCode``), ``.details`` (the server's
message), ``.reason`` and ``.metadata`` (the ErrorInfo, when there was one) and ``.__cause__``
(the original ``grpc.RpcError`` when there was one).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc.error_details_pb2 import ErrorInfo
from google.rpc.status_pb2 import Status

__all__ = [
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
    "ERROR_DOMAIN",
    "error_from_status",
    "error_from_rpc",
    "error_from_step_error",
    "rich_error_info",
    "status_code_from_int",
]

# The ErrorInfo domain of seqserve's reasons. An ErrorInfo of another domain (added by a proxy,
# say) names reasons from another vocabulary and is ignored.
ERROR_DOMAIN = "seqserve"
# The trailer that carries a serialized google.rpc.Status (gRPC's richer error model).
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class SeqServeError(Exception):
    """Base class of every error the SDK raises for a failed call.

    Attributes:
        code: the gRPC status code of the failure.
        details: the server's message (or the SDK's own when the call never reached the server).
        reason: the server's stable reason (e.g. ``"SESSION_EXPIRED"``), ``None`` when the status
            carried none (transport failures, errors raised by the SDK itself, older servers).
        metadata: the values the reason refers to (e.g. ``expected``/``actual`` positions), as strings.
    """

    def __init__(
        self,
        details: str,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ):
        super().__init__(details)
        self.code = code
        self.details = details
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})

    def __str__(self) -> str:
        return self.details or self.code.name


class NotFound(SeqServeError):
    """Something the call named does not exist on the server (NOT_FOUND)."""


class SessionNotFound(NotFound):
    """The session id is unknown to the server (never created, or closed): SESSION_NOT_FOUND, SESSION_CLOSED."""


class SessionExpired(SessionNotFound):
    """The server dropped the session: idle expiry (SESSION_EXPIRED) or eviction for room (SESSION_EVICTED)."""


class ModelNotFound(NotFound):
    """The model name (or version) is not served (MODEL_NOT_FOUND)."""


class AlreadyExists(SeqServeError):
    """A session with the requested id already exists (ALREADY_EXISTS)."""


class FailedPrecondition(SeqServeError):
    """The call is valid but the session is not in a state that allows it (FAILED_PRECONDITION)."""


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class PositionMismatch(FailedPrecondition):
    """The step's ``expected_position`` does not match the session's position on the server.

    ``expected`` and ``actual`` hold the two positions, read from the error's metadata (``None``
    when absent). Refresh with ``session.info()`` before carrying on.
    """

    def __init__(
        self,
        details: str,
        code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ):
        super().__init__(details, code, reason=reason, metadata=metadata)
        self.expected = _int_or_none(self.metadata.get("expected"))
        self.actual = _int_or_none(self.metadata.get("actual"))


class InvalidInput(SeqServeError):
    """The request itself is wrong: bad token ids, wrong frame width, bad options (INVALID_ARGUMENT)."""


class Overloaded(SeqServeError):
    """The server refused the work for lack of capacity; retry later (RESOURCE_EXHAUSTED)."""


class Unauthenticated(SeqServeError):
    """Missing or bad credentials (UNAUTHENTICATED)."""


class PermissionDenied(SeqServeError):
    """The credentials are valid but not allowed to do this (PERMISSION_DENIED)."""


class Unavailable(SeqServeError):
    """The server could not be reached, the connection dropped, or it is shutting down (UNAVAILABLE)."""


class DeadlineExceeded(SeqServeError):
    """The call did not finish within its deadline (DEADLINE_EXCEEDED)."""


class Cancelled(SeqServeError):
    """The call was cancelled (CANCELLED)."""


# Reasons that name a more precise class than their status code does. Every other reason (e.g.
# SESSION_GENERATING, TOKEN_OUT_OF_RANGE, SESSION_LIMIT) gets its code's class, with ``.reason`` set.
_BY_REASON: dict[str, type[SeqServeError]] = {
    "SESSION_NOT_FOUND": SessionNotFound,
    "SESSION_CLOSED": SessionNotFound,
    "SESSION_EXPIRED": SessionExpired,
    "SESSION_EVICTED": SessionExpired,
    "MODEL_NOT_FOUND": ModelNotFound,
    "POSITION_MISMATCH": PositionMismatch,
}

_BY_CODE: dict[grpc.StatusCode, type[SeqServeError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.OUT_OF_RANGE: InvalidInput,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}

_CODE_BY_INT: dict[int, grpc.StatusCode] = {sc.value[0]: sc for sc in grpc.StatusCode}


def status_code_from_int(value: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` whose numeric value is ``value`` (UNKNOWN for unknown numbers)."""
    return _CODE_BY_INT.get(int(value), grpc.StatusCode.UNKNOWN)


def error_from_status(
    code: grpc.StatusCode, details: str | None, reason: str | None = None, metadata: Mapping[str, str] | None = None
) -> SeqServeError:
    """Build the SDK exception for a status: by ``reason`` when there is one, else by ``code``."""
    text = details or code.name.lower().replace("_", " ")
    cls = _BY_REASON.get(reason or "") or _BY_CODE.get(code, SeqServeError)
    return cls(text, code, reason=reason or None, metadata=metadata)


def rich_error_info(code: grpc.StatusCode, trailing_metadata: Iterable[tuple[str, Any]] | None) -> ErrorInfo | None:
    """The seqserve ErrorInfo in a call's ``grpc-status-details-bin`` trailer, if there is one.

    A trailer that does not parse, or whose status code is not the call's, is ignored: it cannot
    be trusted to describe this failure.
    """
    for key, value in trailing_metadata or ():
        if key != _STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = Status()
        try:
            status.ParseFromString(value)
        except DecodeError:
            return None
        if status.code != code.value[0]:
            return None
        for detail in status.details:
            info = ErrorInfo()
            if detail.Unpack(info) and info.domain == ERROR_DOMAIN:  # Unpack is False for other detail types
                return info
        return None
    return None


def error_from_rpc(exc: grpc.RpcError) -> SeqServeError:
    """Map a ``grpc.RpcError`` (blocking or asyncio) to the SDK exception; raise it ``from exc``."""
    code_fn = getattr(exc, "code", None)
    details_fn = getattr(exc, "details", None)
    trailers_fn = getattr(exc, "trailing_metadata", None)
    code = (code_fn() if callable(code_fn) else None) or grpc.StatusCode.UNKNOWN
    details = details_fn() if callable(details_fn) else str(exc)
    info = rich_error_info(code, trailers_fn() if callable(trailers_fn) else None)
    if info is None:
        return error_from_status(code, details)
    return error_from_status(code, details, info.reason, dict(info.metadata))


def error_from_step_error(code: int, message: str, reason: str, metadata: Mapping[str, str]) -> SeqServeError:
    """The SDK exception for a StepResult ``error`` of a StepStream (its fields, unpacked)."""
    return error_from_status(status_code_from_int(code), message, reason or None, metadata)

"""The SDK's exceptions: one class per thing a caller may want to handle differently.

Every gRPC failure surfaces as a :class:`SeqServeError` subclass carrying the server's message.
The raw status stays reachable: ``.code`` (a ``grpc.StatusCode``), ``.details`` (the server's
message) and ``.__cause__`` (the original ``grpc.RpcError`` when there was one).
"""

from __future__ import annotations

import re
from typing import Literal

import grpc

__all__ = [
    "SeqServeError", "NotFound", "SessionNotFound", "SessionExpired", "ModelNotFound", "AlreadyExists",
    "FailedPrecondition", "PositionMismatch", "InvalidInput", "Overloaded", "Unauthenticated",
    "PermissionDenied", "Unavailable", "DeadlineExceeded", "Cancelled", "error_from_status",
    "error_from_rpc", "status_code_from_int",
]

# What a NOT_FOUND from a given call is about: the session named in it, or the model.
NotFoundSubject = Literal["session", "model", "unknown"]


class SeqServeError(Exception):
    """Base class of every error the SDK raises for a failed call.

    Attributes:
        code: the gRPC status code of the failure.
        details: the server's message (or the SDK's own when the call never reached the server).
    """

    def __init__(self, details: str, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN):
        super().__init__(details)
        self.code = code
        self.details = details

    def __str__(self) -> str:
        return self.details or self.code.name


class NotFound(SeqServeError):
    """Something the call named does not exist on the server (NOT_FOUND)."""


class SessionNotFound(NotFound):
    """The session id is unknown to the server (never created, or already closed)."""


class SessionExpired(SessionNotFound):
    """The session existed but the server dropped it (idle expiry or eviction under memory pressure)."""


class ModelNotFound(NotFound):
    """The model name (or version) is not served."""


class AlreadyExists(SeqServeError):
    """A session with the requested id already exists (ALREADY_EXISTS)."""


class FailedPrecondition(SeqServeError):
    """The call is valid but the session is not in a state that allows it (FAILED_PRECONDITION)."""


class PositionMismatch(FailedPrecondition):
    """The step's ``expected_position`` does not match the session's position on the server.

    ``expected`` and ``actual`` hold the two positions when the server's message names them
    (``None`` otherwise). Refresh with ``session.info()`` before carrying on.
    """

    def __init__(self, details: str, code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION,
                 expected: int | None = None, actual: int | None = None):
        super().__init__(details, code)
        self.expected = expected
        self.actual = actual


class InvalidInput(SeqServeError):
    """The request itself is wrong: bad token ids, wrong frame width, bad options (INVALID_ARGUMENT)."""


class Overloaded(SeqServeError):
    """The server refused the work for lack of capacity; retry later (RESOURCE_EXHAUSTED)."""


class Unauthenticated(SeqServeError):
    """Missing or bad credentials (UNAUTHENTICATED)."""


class PermissionDenied(SeqServeError):
    """The credentials are valid but not allowed to do this (PERMISSION_DENIED)."""


class Unavailable(SeqServeError):
    """The server could not be reached or the connection dropped (UNAVAILABLE)."""


class DeadlineExceeded(SeqServeError):
    """The call did not finish within its deadline (DEADLINE_EXCEEDED)."""


class Cancelled(SeqServeError):
    """The call was cancelled (CANCELLED)."""


_BY_CODE: dict[grpc.StatusCode, type[SeqServeError]] = {
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

_EXPIRED_RE = re.compile(r"\b(expired|evicted)\b", re.IGNORECASE)
_MODEL_RE = re.compile(r"\bmodel\b", re.IGNORECASE)
_SESSION_RE = re.compile(r"\bsession\b", re.IGNORECASE)
_POSITION_RE = re.compile(r"position", re.IGNORECASE)
_EXPECTED_RE = re.compile(r"expected(?:[ _]position)?\D{0,12}?(\d+)", re.IGNORECASE)
_ACTUAL_RE = re.compile(
    r"(?:actual(?:[ _]position)?|is at(?: position)?|current(?:ly)?(?: at)?(?: position)?|session position)"
    r"\D{0,12}?(\d+)", re.IGNORECASE)


def status_code_from_int(value: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` whose numeric value is ``value`` (UNKNOWN for unknown numbers)."""
    return _CODE_BY_INT.get(int(value), grpc.StatusCode.UNKNOWN)


def _not_found_class(details: str, subject: NotFoundSubject) -> type[SeqServeError]:
    if _EXPIRED_RE.search(details):
        return SessionExpired
    mentions_model = bool(_MODEL_RE.search(details))
    mentions_session = bool(_SESSION_RE.search(details))
    if subject == "model" or (mentions_model and not mentions_session):
        return ModelNotFound
    if subject == "session" or mentions_session:
        return SessionNotFound
    return NotFound


def _position_mismatch(details: str, code: grpc.StatusCode) -> PositionMismatch:
    expected = _EXPECTED_RE.search(details)
    actual = _ACTUAL_RE.search(details)
    return PositionMismatch(details, code,
                            expected=int(expected.group(1)) if expected else None,
                            actual=int(actual.group(1)) if actual else None)


def error_from_status(code: grpc.StatusCode, details: str | None,
                      subject: NotFoundSubject = "unknown") -> SeqServeError:
    """Build the SDK exception for a status ``code`` and message ``details``.

    ``subject`` says what a NOT_FOUND from this call refers to when the message alone does not
    (CreateSession: the model; calls on a session: the session).
    """
    text = details or code.name.lower().replace("_", " ")
    if code == grpc.StatusCode.NOT_FOUND:
        return _not_found_class(text, subject)(text, code)
    if code == grpc.StatusCode.FAILED_PRECONDITION and _POSITION_RE.search(text) and _EXPECTED_RE.search(text):
        return _position_mismatch(text, code)
    return _BY_CODE.get(code, SeqServeError)(text, code)


def error_from_rpc(exc: grpc.RpcError, subject: NotFoundSubject = "unknown") -> SeqServeError:
    """Map a ``grpc.RpcError`` (sync or aio) to the SDK exception; raise it ``from exc``."""
    code_fn = getattr(exc, "code", None)
    details_fn = getattr(exc, "details", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details = details_fn() if callable(details_fn) else str(exc)
    return error_from_status(code or grpc.StatusCode.UNKNOWN, details, subject)

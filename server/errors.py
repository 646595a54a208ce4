"""The one exception type the engine raises for a request it cannot serve.

Every refusal carries a protocol-neutral status ``Code``, a stable machine-readable ``Reason``,
a message a user can act on and string metadata (the values a program needs, such as the expected
and actual positions). The API layer (server/api/) turns it into a gRPC status with a
``google.rpc.ErrorInfo`` detail, or into a StepResult ``error`` on a stream. Clients branch on the
reason, never on the message: messages may be reworded, reasons may not (docs/server.md, "Errors").
"""

from __future__ import annotations

import enum


class Code(enum.Enum):
    """Status codes, named as in google.rpc.Code (which gRPC's status codes are)."""

    INVALID_ARGUMENT = 3
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    INTERNAL = 13
    UNAVAILABLE = 14


class Reason(enum.StrEnum):
    """Why a request failed. Each member is listed in docs/server.md's error table (a test checks)."""

    # the request names something that is not there
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    SESSION_NOT_FOUND = "SESSION_NOT_FOUND"
    SESSION_EXPIRED = "SESSION_EXPIRED"
    SESSION_EVICTED = "SESSION_EVICTED"
    SESSION_CLOSED = "SESSION_CLOSED"
    # creating sessions
    MODEL_REQUIRED = "MODEL_REQUIRED"
    INVALID_SESSION_ID = "INVALID_SESSION_ID"
    SESSION_EXISTS = "SESSION_EXISTS"
    SESSION_LIMIT = "SESSION_LIMIT"
    ALL_SESSIONS_BUSY = "ALL_SESSIONS_BUSY"
    # the session's state does not allow the call
    POSITION_MISMATCH = "POSITION_MISMATCH"
    SESSION_GENERATING = "SESSION_GENERATING"
    SESSION_BUSY = "SESSION_BUSY"
    NOTHING_TO_CONTINUE = "NOTHING_TO_CONTINUE"
    EARLIER_STEP_FAILED = "EARLIER_STEP_FAILED"
    # the input
    WRONG_INPUT_KIND = "WRONG_INPUT_KIND"
    EMPTY_INPUT = "EMPTY_INPUT"
    TOKEN_OUT_OF_RANGE = "TOKEN_OUT_OF_RANGE"
    TOO_MANY_TOKENS = "TOO_MANY_TOKENS"
    PARTIAL_FRAME = "PARTIAL_FRAME"
    NON_FINITE_FEATURES = "NON_FINITE_FEATURES"
    INVALID_STEP_COLUMNS = "INVALID_STEP_COLUMNS"
    # the KServe v2 / Triton API (server/api/kserve*.py)
    INVALID_TENSOR = "INVALID_TENSOR"
    INVALID_PARAMETER = "INVALID_PARAMETER"
    INVALID_SEQUENCE_ID = "INVALID_SEQUENCE_ID"
    SEQUENCE_NOT_STARTED = "SEQUENCE_NOT_STARTED"
    # the options
    INVALID_OUTPUT_SPEC = "INVALID_OUTPUT_SPEC"
    INVALID_SAMPLING = "INVALID_SAMPLING"
    INVALID_MAX_TOKENS = "INVALID_MAX_TOKENS"
    INVALID_STOP = "INVALID_STOP"
    NOT_GENERATIVE = "NOT_GENERATIVE"
    # the server
    STARTING = "STARTING"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    RUN_FAILED = "RUN_FAILED"


class ServeError(Exception):
    """A request failed: ``code``, ``reason``, a human-readable message and string metadata."""

    __slots__ = ("code", "reason", "message", "metadata")

    def __init__(self, code: Code, reason: Reason, message: str, **metadata: object):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = {key: str(value) for key, value in metadata.items()}

    def __repr__(self) -> str:
        return f"ServeError({self.code.name}, {self.reason}, {self.message!r})"


def invalid(reason: Reason, message: str, **metadata: object) -> ServeError:
    return ServeError(Code.INVALID_ARGUMENT, reason, message, **metadata)


def not_found(reason: Reason, message: str, **metadata: object) -> ServeError:
    return ServeError(Code.NOT_FOUND, reason, message, **metadata)


def precondition(reason: Reason, message: str, **metadata: object) -> ServeError:
    return ServeError(Code.FAILED_PRECONDITION, reason, message, **metadata)


def exhausted(reason: Reason, message: str, **metadata: object) -> ServeError:
    return ServeError(Code.RESOURCE_EXHAUSTED, reason, message, **metadata)


def unavailable(message: str, reason: Reason = Reason.SHUTTING_DOWN) -> ServeError:
    return ServeError(Code.UNAVAILABLE, reason, message)


def run_failed(message: str, **metadata: object) -> ServeError:
    return ServeError(Code.INTERNAL, Reason.RUN_FAILED, message, **metadata)


def already_exists(reason: Reason, message: str, **metadata: object) -> ServeError:
    return ServeError(Code.ALREADY_EXISTS, reason, message, **metadata)

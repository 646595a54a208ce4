"""The one exception type the engine raises for a request it cannot serve.

Every refusal carries a gRPC status code and a message a user can act on; the servicer turns it
into the call's status (unary) or into a StepResult ``error`` (streams).
"""

from __future__ import annotations

import grpc


class ServeError(Exception):
    """A request failed with ``code`` (a grpc.StatusCode) and a human-readable message."""

    __slots__ = ("code", "message")

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"ServeError({self.code.name}, {self.message!r})"


def invalid(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.NOT_FOUND, message)


def precondition(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.FAILED_PRECONDITION, message)


def exhausted(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def unavailable(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.UNAVAILABLE, message)


def internal(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.INTERNAL, message)


def already_exists(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.ALREADY_EXISTS, message)

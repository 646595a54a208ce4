"""Outcome counting for RPCs, and the one place a servicer's ServeError becomes a gRPC status.

Servicers wrap each method in ``unary`` or ``server_stream``: the body only converts and calls the
engine, and the wrapper counts the call (OK, or the error's code and reason) and aborts with the
rich status. Streams that answer message by message (StepStream) count each answer through their
outbox instead, so one long stream is as many requests as it carried steps.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from ..errors import ServeError
from .status import abort

T = TypeVar("T")


class CallCounts:
    """Requests by (rpc, code name, reason); reason is "" for OK. Read by metrics at scrape time."""

    __slots__ = ("counts", "open_streams")

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str, str]] = Counter()
        self.open_streams: Counter[str] = Counter()  # bidirectional streams open, by rpc

    def ok(self, key: tuple[str, str, str]) -> None:
        self.counts[key] += 1

    def failed(self, rpc: str, err: ServeError) -> None:
        self.counts[(rpc, err.code.name, err.reason.value)] += 1

    def other(self, rpc: str, code: str) -> None:
        """An outcome that is no ServeError: the client cancelled, or a bug raised."""
        self.counts[(rpc, code, "")] += 1


def _code_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def ok_key(rpc: str) -> tuple[str, str, str]:
    return (rpc, "OK", "")


def unary(rpc: str) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Wrap a unary servicer method (``self.calls`` is its CallCounts)."""
    key = ok_key(rpc)

    def wrap(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(method)
        async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
            try:
                result = await method(self, request, context)
            except ServeError as err:
                self.calls.failed(rpc, err)
                await abort(context, err)
                raise  # abort raised already; this line is for type checkers
            except grpc.aio.AbortError:  # the method aborted by itself, with its own status
                self.calls.other(rpc, _code_name(context))
                raise
            except asyncio.CancelledError:
                self.calls.other(rpc, "CANCELLED")
                raise
            except Exception:
                self.calls.other(rpc, "UNKNOWN")
                raise
            self.calls.ok(key)
            return result

        return handler

    return wrap


def server_stream(rpc: str) -> Callable[[Callable[..., AsyncIterator[T]]], Callable[..., AsyncIterator[T]]]:
    """Wrap a server-streaming servicer method (an async generator), counted once when it ends."""
    key = ok_key(rpc)

    def wrap(method: Callable[..., AsyncIterator[T]]) -> Callable[..., AsyncIterator[T]]:
        @functools.wraps(method)
        async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[T]:
            try:
                async for message in method(self, request, context):
                    yield message
            except ServeError as err:
                self.calls.failed(rpc, err)
                await abort(context, err)
                raise
            except grpc.aio.AbortError:
                self.calls.other(rpc, _code_name(context))
                raise
            except (asyncio.CancelledError, GeneratorExit):
                self.calls.other(rpc, "CANCELLED")
                raise
            except Exception:
                self.calls.other(rpc, "UNKNOWN")
                raise
            self.calls.ok(key)

        return handler

    return wrap

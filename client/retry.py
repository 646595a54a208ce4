"""Resending calls after UNAVAILABLE, and mapping the final failure to an SDK exception.

Only UNAVAILABLE is retried: it means the call may not have reached the server or the connection
dropped. Steps stay exactly-once because every step carries ``expected_position``: a resend of a
step the server already applied returns the cached result instead of advancing again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from .config import ClientConfig
from .errors import SeqServeError, error_from_rpc

__all__ = ["is_retryable", "call_with_retry", "call_with_retry_async"]

T = TypeVar("T")

def is_retryable(exc: BaseException) -> bool:
    """True for a gRPC failure worth resending (UNAVAILABLE)."""
    code = getattr(exc, "code", None)
    return isinstance(exc, grpc.RpcError) and callable(code) and code() == grpc.StatusCode.UNAVAILABLE


def call_with_retry(call: Callable[[], T], config: ClientConfig,
                    recover: Callable[[SeqServeError, int], T | None] | None = None) -> T:
    """Run ``call``, resending on UNAVAILABLE up to ``config.max_retries`` times with backoff.

    ``recover(error, attempt)`` may turn a failure of a resend (attempt >= 1) into a value, e.g.
    ALREADY_EXISTS after resending a create that did reach the server the first time.
    """
    attempt = 0
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            if is_retryable(exc) and attempt < config.max_retries:
                time.sleep(config.backoff(attempt))
                attempt += 1
                continue
            error = error_from_rpc(exc)
            recovered = recover(error, attempt) if recover and attempt else None
            if recovered is not None:
                return recovered
            raise error from exc


async def call_with_retry_async(call: Callable[[], Awaitable[T]], config: ClientConfig,
                                recover: Callable[[SeqServeError, int], Awaitable[T | None]] | None = None) -> T:
    """Async twin of :func:`call_with_retry`."""
    attempt = 0
    while True:
        try:
            return await call()
        except grpc.RpcError as exc:
            if is_retryable(exc) and attempt < config.max_retries:
                await asyncio.sleep(config.backoff(attempt))
                attempt += 1
                continue
            error = error_from_rpc(exc)
            recovered = await recover(error, attempt) if recover and attempt else None
            if recovered is not None:
                return recovered
            raise error from exc

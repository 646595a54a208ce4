"""When to resend a call: after UNAVAILABLE only, a bounded number of times, with backoff.

UNAVAILABLE means the call may not have reached the server or the connection dropped. Steps stay
exactly-once because every step carries ``expected_position``: a resend of a step the server
already applied returns the cached result instead of advancing again. The loops that resend live
with their calls (the clients, the sessions' Generate, the streams); the decision lives here, once.
"""

from __future__ import annotations

import grpc

from .config import ClientConfig

__all__ = ["is_retryable", "Resends"]


def is_retryable(exc: BaseException) -> bool:
    """True for a gRPC failure worth resending (UNAVAILABLE)."""
    code = getattr(exc, "code", None)
    return isinstance(exc, grpc.RpcError) and callable(code) and code() == grpc.StatusCode.UNAVAILABLE


class Resends:
    """The resends of one call: whether another is due after a failure, and after how long."""

    def __init__(self, config: ClientConfig):
        self._config = config
        self.count = 0

    def delay(self, exc: BaseException) -> float | None:
        """Seconds to wait before resending after ``exc``; ``None``: give up and report ``exc``."""
        return self.next(is_retryable(exc))

    def next(self, retryable: bool) -> float | None:
        """Seconds to wait before the next resend of a failure that is (or is not) ``retryable``;
        ``None`` when it is not, or when the resends are used up."""
        if not retryable or self.count >= self._config.max_retries:
            return None
        delay = self._config.backoff(self.count)
        self.count += 1
        return delay

    def reset(self) -> None:
        """The call made progress (a stream got an answer): the next failure starts counting afresh."""
        self.count = 0

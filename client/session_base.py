"""State and option handling shared by :class:`Session` and :class:`AsyncSession`."""

from __future__ import annotations

import time

import numpy as np

from .errors import FailedPrecondition, InvalidInput, NotFound, PositionMismatch, SeqServeError
from .text import Utf8StreamDecoder
from .types import GenerateChunk, Output, Sampling, SessionInfo

__all__ = ["SessionBase", "make_output", "GenerationState", "SETTLE_SECONDS"]

# How long the first call after an abandoned generation waits for the server to wind it down.
SETTLE_SECONDS = 5.0


_DEFAULT_OUTPUT = Output()


def make_output(
    output: Output | None,
    *,
    top_k: int = 0,
    logits: bool = False,
    argmax: bool = False,
    probs: bool = False,
    sample: Sampling | None = None,
    all_positions: bool = False,
    none: bool = False,
) -> Output:
    """An :class:`Output` from either a ready one or the keyword shorthand (not both)."""
    keywords = top_k or logits or argmax or probs or sample is not None or all_positions or none
    if output is None:
        return (
            Output(
                top_k=top_k,
                logits=logits,
                argmax=argmax,
                probs=probs,
                sample=sample,
                all_positions=all_positions,
                none=none,
            )
            if keywords
            else _DEFAULT_OUTPUT
        )
    if keywords:
        raise ValueError("pass either output=Output(...) or output keywords, not both")
    return output  # a step path: no Output built per step


class SessionBase:
    """A server-side session seen from the client: id, model, and the locally tracked position.

    The position advances with every result; ``info()`` refreshes it from the server. A session
    object is not safe to use from several threads (or tasks) at once; use one per sequence.
    """

    def __init__(self, info: SessionInfo, close_on_exit: bool = True):
        self._info = info
        self._position = int(info.position)
        self._close_on_exit = close_on_exit
        self._closed = False
        # True after a generation was abandoned midway: the server may have gone further than the
        # tokens received, so the position is re-read before the next call.
        self._stale = False
        # Monotonic deadline until which that next call waits out the server finishing the abandoned
        # generation (reason SESSION_GENERATING, or a position still moving); 0: not waiting.
        self._settle_until = 0.0

    @property
    def id(self) -> str:
        """The session id (give it to ``client.attach`` to continue the session elsewhere)."""
        return self._info.session_id

    @property
    def model(self) -> str:
        """Name of the model the session runs."""
        return self._info.model

    @property
    def version(self) -> int:
        """The model version the session is pinned to."""
        return self._info.version

    @property
    def position(self) -> int:
        """Positions (tokens or frames) consumed so far, as tracked from results."""
        return self._position

    @property
    def closed(self) -> bool:
        """True once ``close()`` succeeded."""
        return self._closed

    @property
    def last_info(self) -> SessionInfo:
        """The SessionInfo last received from the server (creation, ``info()`` or ``reset()``)."""
        return self._info

    def _advance(self, position: int) -> None:
        self._position = int(position)

    def _should_settle(self, error: SeqServeError, attempt: int) -> float | None:
        """After an abandoned generation: seconds to wait before retrying ``error``, or None to raise it."""
        if time.monotonic() >= self._settle_until:
            return None
        still_running = isinstance(error, PositionMismatch) or error.reason == "SESSION_GENERATING"
        if not still_running:
            return None
        self._stale = True
        return float(min(0.01 * 2.0**attempt, 0.2))

    def _refreshed(self, info: SessionInfo) -> SessionInfo:
        self._info = info
        self._position = int(info.position)
        self._stale = False
        return info

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"session {self.id} is closed")

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"position={self._position}"
        return f"{type(self).__name__}(id={self.id!r}, model={self.model!r}, version={self.version}, {state})"


class GenerationState:
    """Bookkeeping of one generation: tokens so far, finish reason, and incremental text decoding."""

    def __init__(self, session: SessionBase, decode: bool):
        self.session = session
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.text_parts: list[str] = []
        self.refused = False  # the server turned the call down before starting: nothing advanced
        self._decoder = Utf8StreamDecoder() if decode else None

    def take(self, tokens: np.ndarray, position: int, finish_reason: str | None) -> GenerateChunk:
        """Record one message from the server and return it as a chunk."""
        self.tokens.extend(int(t) for t in tokens)
        self.session._advance(position)
        if finish_reason:
            self.finish_reason = finish_reason
        return GenerateChunk(tokens=tokens, position=position, finish_reason=finish_reason)

    def refusal(self, error: SeqServeError, received: bool) -> None:
        """Note an error that proves the server never started this generation."""
        if not received and isinstance(error, (FailedPrecondition, InvalidInput, NotFound)):
            self.refused = True

    def text_of(self, chunk: GenerateChunk) -> str:
        """The text completed by ``chunk`` (and, on the last chunk, whatever was held back)."""
        assert self._decoder is not None
        text = self._decoder.decode(chunk.tokens)
        if chunk.finish_reason:
            text += self._decoder.finish()
        self.text_parts.append(text)
        return text

    def end_text(self) -> str:
        """Flush the decoder at the end of the stream."""
        if self._decoder is None:
            return ""
        tail = self._decoder.finish()
        self.text_parts.append(tail)
        return tail

    def abandoned(self) -> None:
        """The caller stopped reading before the end: the server position is no longer known."""
        if self.finish_reason is None and not self.refused:
            self.session._stale = True
            self.session._settle_until = time.monotonic() + SETTLE_SECONDS

    @property
    def text(self) -> str:
        """The text yielded so far."""
        return "".join(self.text_parts)

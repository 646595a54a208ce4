"""Text helpers for byte-level language models, whose token ids are the bytes of UTF-8 text.

A generated character may span several tokens (``"é"`` is two bytes, an emoji four), so text is
decoded incrementally: :class:`Utf8StreamDecoder` holds back the bytes of an unfinished character
until the rest arrives and only replaces what is left over when the stream ends.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["encode_text", "decode_tokens", "as_stop_bytes", "Utf8StreamDecoder"]


def encode_text(text: str) -> list[int]:
    """The byte ids (0..255) of ``text`` encoded as UTF-8."""
    return list(text.encode("utf-8"))


def _token_bytes(tokens: Iterable[int]) -> bytes:
    ids = [int(t) for t in tokens]
    bad = [t for t in ids if not 0 <= t <= 255]
    if bad:
        raise ValueError(
            f"token id {bad[0]} is not a byte (0..255); this model's tokens are not UTF-8 bytes, "
            "use the token ids directly"
        )
    return bytes(ids)


def decode_tokens(tokens: Iterable[int], errors: str = "replace") -> str:
    """Decode a complete sequence of byte ids as UTF-8 (invalid bytes become U+FFFD by default)."""
    return _token_bytes(tokens).decode("utf-8", errors=errors)


def as_stop_bytes(stop: str | bytes | Sequence[str | bytes] | None) -> list[bytes]:
    """Normalise a stop sequence option (one or many, text or bytes) into a list of byte strings."""
    if stop is None:
        return []
    items: Sequence[str | bytes] = [stop] if isinstance(stop, (str, bytes)) else stop
    out = [s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in items]
    if any(not s for s in out):
        raise ValueError("stop sequences must not be empty")
    return out


class Utf8StreamDecoder:
    """Turns byte ids arriving in pieces into text, never splitting a multi-byte character.

    ``decode(ids)`` returns the text completed by these ids (possibly ``""`` while a character is
    unfinished); ``finish()`` returns what is left, with an unfinished character replaced by U+FFFD.
    Bytes that can never start or continue a valid character are replaced as soon as they are seen.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._finished = False

    def decode(self, tokens: Iterable[int] | np.ndarray) -> str:
        """Feed more byte ids; return the newly completed text."""
        if self._finished:
            raise ValueError("decoder already finished")
        return self._decoder.decode(_token_bytes(tokens), final=False)

    def finish(self) -> str:
        """End the stream: return the held-back bytes of an unfinished character as U+FFFD (or "")."""
        if self._finished:
            return ""
        self._finished = True
        return self._decoder.decode(b"", final=True)

    @property
    def pending(self) -> int:
        """Number of bytes held back waiting for the rest of a character."""
        buffered, _ = self._decoder.getstate()
        return len(buffered)

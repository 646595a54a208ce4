"""UTF-8 helpers for byte-level models: encoding, and incremental decoding that never splits a character."""

from __future__ import annotations

import numpy as np
import pytest

from seqserve.client import Utf8StreamDecoder, as_stop_bytes, decode_tokens, encode_text

SAMPLES = ["plain ascii", "héllo wörld", "日本語のテキスト", "emoji 🙂🚀 and 𝄞 clef", "mixed: é日🙂a"]


@pytest.mark.parametrize("text", SAMPLES)
def test_encode_is_utf8_bytes(text):
    ids = encode_text(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i <= 255 for i in ids)
    assert decode_tokens(ids) == text


@pytest.mark.parametrize("text", SAMPLES)
def test_split_anywhere_never_emits_a_broken_character(text):
    ids = encode_text(text)
    # Every way of cutting the bytes into two pieces, then one token at a time.
    for cut in range(len(ids) + 1):
        dec = Utf8StreamDecoder()
        pieces = [dec.decode(ids[:cut]), dec.decode(ids[cut:]), dec.finish()]
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)
    dec = Utf8StreamDecoder()
    pieces = [dec.decode([i]) for i in ids] + [dec.finish()]
    assert "".join(pieces) == text
    # A piece is emitted exactly when its character completes.
    assert [p for p in pieces if p] == list(text)


def test_held_back_bytes_are_counted_and_replaced_only_at_the_end():
    dec = Utf8StreamDecoder()
    emoji = encode_text("🙂")
    assert dec.decode(emoji[:3]) == ""
    assert dec.pending == 3
    assert dec.finish() == "\ufffd"  # an unfinished character at the very end
    assert dec.finish() == ""
    with pytest.raises(ValueError):
        dec.decode([65])


def test_invalid_bytes_are_replaced_as_they_arrive():
    dec = Utf8StreamDecoder()
    assert dec.decode([0xFF]) == "\ufffd"  # can never start a character: no need to wait
    assert dec.decode(np.array([0x41], dtype=np.int32)) == "A"
    assert dec.decode([0xC3]) == ""
    assert dec.decode([0x41]) == "\ufffdA"  # the lead byte was not followed by a continuation byte


def test_non_byte_token_ids_are_refused():
    with pytest.raises(ValueError, match="not a byte"):
        Utf8StreamDecoder().decode([300])
    with pytest.raises(ValueError, match="not a byte"):
        decode_tokens([-1])


def test_stop_sequences_normalise_to_bytes():
    assert as_stop_bytes(None) == []
    assert as_stop_bytes("\n") == [b"\n"]
    assert as_stop_bytes(["é", b"\x00"]) == ["é".encode(), b"\x00"]
    with pytest.raises(ValueError):
        as_stop_bytes([""])

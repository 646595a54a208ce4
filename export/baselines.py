"""Compressor baselines for a language model: bits per held-out byte given the training text.

A compressor "predicts" the validation text after having seen the training text when we measure
the extra compressed size it needs for the held-out bytes:

    (len(C(train + val)) - len(C(train))) * 8 / len(val)

which is directly comparable with the model's validation bits per byte (cross-entropy / ln 2).
"""

from __future__ import annotations

import lzma
import zlib


def conditional_bits_per_byte(compress, train: bytes, val: bytes) -> float:
    """Extra bits per byte ``compress`` spends on ``val`` once it has seen ``train``."""
    if not val:
        raise ValueError("no validation bytes to score")
    return (len(compress(train + val)) - len(compress(train))) * 8 / len(val)


def zlib_bits_per_byte(train: bytes, val: bytes) -> float:
    """zlib (DEFLATE) at level 9; its 32 KB window sees only the end of the training text."""
    return conditional_bits_per_byte(lambda b: zlib.compress(b, 9), train, val)


def xz_bits_per_byte(train: bytes, val: bytes) -> float:
    """xz (LZMA2) at preset 9 | extreme; its large dictionary sees all of the training text."""
    return conditional_bits_per_byte(lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), train, val)


def compressor_baselines(train: bytes, val: bytes) -> dict[str, float]:
    """Both figures, rounded for the manifest."""
    return {
        "zlib_bits_per_byte": round(zlib_bits_per_byte(train, val), 4),
        "xz_bits_per_byte": round(xz_bits_per_byte(train, val), 4),
    }

"""Checking a step's input against its model: token ids in range, whole float32 frames, limits.

Returns what a work item carries: the number of positions and the input (an int for a single
token, the hot path; else an array).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .domain import StepBlock
from .errors import Reason, invalid


def check_input(model: Any, tokens: Sequence[int], features: bytes, max_positions: int) -> tuple[int, Any]:
    """``(n, x)`` for a step of ``tokens`` or ``features`` on ``model``; raise INVALID_ARGUMENT."""
    if model.tokens:
        if features:
            raise invalid(
                Reason.WRONG_INPUT_KIND,
                f"model {model.key} takes token ids in `tokens`, not `features`",
                expected="tokens",
            )
        n = len(tokens)
        if n == 1:
            t = tokens[0]
            if not 0 <= t < model.vocab:
                raise _out_of_range(model, t, None)
            return 1, t
        if n == 0:
            raise invalid(Reason.EMPTY_INPUT, "empty step: give at least one token")
        _check_length(n, max_positions, "tokens")
        x = np.array(tokens, np.int64)
        bad = (x < 0) | (x >= model.vocab)
        if bad.any():
            i = int(np.argmax(bad))
            raise _out_of_range(model, int(x[i]), i)
        return n, x
    if len(tokens):
        raise invalid(
            Reason.WRONG_INPUT_KIND,
            f"model {model.key} takes float32 frames in `features`, not token ids",
            expected="features",
        )
    size = len(features)
    if size == 0:
        raise invalid(Reason.EMPTY_INPUT, "empty step: give at least one feature frame")
    if size % model.frame_bytes:
        raise invalid(
            Reason.PARTIAL_FRAME,
            f"features are {size} bytes, not a whole number of frames: model {model.key} takes "
            f"{model.frame_bytes // 4} float32 values ({model.frame_bytes} bytes) per frame",
            frame_bytes=model.frame_bytes,
            size=size,
        )
    n = size // model.frame_bytes
    _check_length(n, max_positions, "frames")
    frames = np.frombuffer(features, "<f4").astype(np.float32).reshape(n, model.frame_bytes // 4)
    if not np.isfinite(frames).all():
        raise invalid(Reason.NON_FINITE_FEATURES, "features contain NaN or infinity")
    return n, frames


def check_block(block: StepBlock) -> None:
    """A column block's columns must agree in length; raise INVALID_STEP_COLUMNS (for every row)."""
    n = len(block.session_ids)
    problem = None
    if len(block.tags) != n:
        problem = f"{len(block.tags)} tags; give one per row"
    elif block.expected is not None and len(block.expected) != n:
        problem = f"{len(block.expected)} expected_positions; give one per row, or none"
    elif block.lengths is None and len(block.tokens) != n:
        problem = f"{len(block.tokens)} tokens and no lengths; without lengths each row takes one token"
    elif block.lengths is not None and len(block.lengths) != n:
        problem = f"{len(block.lengths)} lengths; give one per row, or none (one token each)"
    elif block.lengths is not None and sum(block.lengths) != len(block.tokens):
        problem = f"{len(block.tokens)} tokens but lengths that add up to {sum(block.lengths)}"
    if problem is not None:
        raise invalid(
            Reason.INVALID_STEP_COLUMNS,
            f"a step_columns block with {n} session_ids has {problem}; no row of it was taken",
            rows=n,
        )


def _out_of_range(model: Any, token: int, index: int | None) -> Exception:
    where = "" if index is None else f" at index {index}"
    return invalid(
        Reason.TOKEN_OUT_OF_RANGE,
        f"token id {token}{where} is outside the vocabulary of {model.key} (0..{model.vocab - 1})",
        token=token,
        index=index or 0,
        vocab=model.vocab,
    )


def _check_length(n: int, limit: int, what: str) -> None:
    if n > limit:
        raise invalid(
            Reason.TOO_MANY_TOKENS,
            f"a step may carry at most {limit} {what} (max_tokens_per_step), got {n}; split it",
            limit=limit,
            got=n,
        )

"""Typed results and options of the SDK: dataclasses with numpy arrays, never raw protobufs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ModelInfo", "SessionInfo", "StepResult", "GenerateChunk", "Classification", "Output", "Sampling"]


@dataclass(frozen=True)
class Sampling:
    """How to draw a token from a step's distribution.

    ``temperature`` 0 is greedy (argmax); ``top_k`` 0 and ``top_p`` 0 (or 1) keep the whole
    distribution; a ``seed`` makes the draws reproducible.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class Output:
    """What a step returns. With nothing set the server returns the top 5 ids and log-probs.

    ``all_positions`` returns one row per consumed position instead of the last one only;
    ``none`` returns nothing but the new position (fastest for feeding prompts).
    """

    top_k: int = 0
    logits: bool = False
    argmax: bool = False
    probs: bool = False
    sample: Sampling | None = None
    all_positions: bool = False
    none: bool = False

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        asked = self.top_k or self.logits or self.argmax or self.probs or self.sample is not None
        if self.none and asked:
            raise ValueError("output none=True cannot be combined with other outputs")


@dataclass(frozen=True)
class ModelInfo:
    """A model the server serves, with the key facts of its manifest."""

    name: str
    version: int
    versions: tuple[int, ...]
    kind: str  # "lm" or "classifier"
    cell: str  # "lstm", "gru" or "rnn"
    layers: int
    hidden_size: int
    input_kind: str  # "tokens" or "features"
    input_dim: int  # vocabulary size (tokens) or frame width (features)
    output_size: int
    labels: tuple[str, ...]
    state_bytes_per_session: int
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, pb: Any) -> "ModelInfo":
        """Build from a ``seqserve.v1.ModelInfo`` message."""
        try:
            metrics = json.loads(pb.metrics_json) if pb.metrics_json else {}
        except json.JSONDecodeError:
            metrics = {}
        return cls(
            name=pb.name,
            version=pb.version,
            versions=tuple(pb.versions),
            kind=pb.kind,
            cell=pb.cell,
            layers=pb.layers,
            hidden_size=pb.hidden_size,
            input_kind=pb.input_kind,
            input_dim=pb.input_dim,
            output_size=pb.output_size,
            labels=tuple(pb.labels),
            state_bytes_per_session=pb.state_bytes_per_session,
            metrics=metrics,
        )


@dataclass(frozen=True)
class SessionInfo:
    """A session as the server sees it. Times are Unix milliseconds; ``expires_unix_ms`` 0: never."""

    session_id: str
    model: str
    version: int
    position: int
    created_unix_ms: int
    last_used_unix_ms: int
    expires_unix_ms: int

    @classmethod
    def from_proto(cls, pb: Any) -> "SessionInfo":
        """Build from a ``seqserve.v1.SessionInfo`` message."""
        return cls(
            session_id=pb.session_id,
            model=pb.model,
            version=pb.version,
            position=pb.position,
            created_unix_ms=pb.created_unix_ms,
            last_used_unix_ms=pb.last_used_unix_ms,
            expires_unix_ms=pb.expires_unix_ms,
        )


def _packed(data: bytes, steps: int, width: int) -> np.ndarray | None:
    if not data:
        return None
    values = np.frombuffer(data, dtype="<f4").astype(np.float32)
    return values.reshape(steps, width) if steps and width and values.size == steps * width else values


def _packed_rows(data: bytes, rows: int, width: int) -> np.ndarray | None:
    # [rows, 1, width]: row i is a one-position result's [1, width]
    values = _packed(data, 0, 0)
    if values is None or not width or values.size != rows * width:
        return values
    return values.reshape(rows, 1, width)


def _ints(values: Any) -> np.ndarray | None:
    # fromiter with the length: a few times faster than asarray on a protobuf repeated field
    n = len(values)
    return np.fromiter(values, np.int32, n) if n else None


def _floats(values: Any) -> np.ndarray | None:
    n = len(values)
    return np.fromiter(values, np.float32, n) if n else None


@dataclass(frozen=True)
class StepResult:
    """The outcome of one step. Arrays have one row per covered position (``steps`` rows).

    Fields not requested are ``None``. ``top_k_ids``/``top_k_logprobs`` are ``[steps, k]``,
    ``logits``/``probs`` are ``[steps, width]`` float32, ``argmax``/``sampled`` are ``[steps]``.
    """

    session_id: str
    position: int
    steps: int
    width: int
    tag: int = 0
    top_k_ids: np.ndarray | None = None
    top_k_logprobs: np.ndarray | None = None
    logits: np.ndarray | None = None
    argmax: np.ndarray | None = None
    probs: np.ndarray | None = None
    sampled: np.ndarray | None = None

    @classmethod
    def from_proto(cls, pb: Any) -> "StepResult":
        """Build from a ``seqserve.v1.StepResult`` message (its ``error`` must be checked first)."""
        steps, width = int(pb.steps), int(pb.width)
        ids = _ints(pb.top_k_ids)
        logprobs = _floats(pb.top_k_logprobs)
        if ids is not None and steps and ids.size % steps == 0:
            ids = ids.reshape(steps, ids.size // steps)
            if logprobs is not None and logprobs.size == ids.size:
                logprobs = logprobs.reshape(ids.shape)
        # Filled in directly, not through the frozen dataclass's __init__ (one object.__setattr__
        # per field): this runs once per step on a stream's reader, and the fields are all set here.
        result = object.__new__(cls)
        result.__dict__.update(
            session_id=pb.session_id,
            position=int(pb.position),
            steps=steps,
            width=width,
            tag=int(pb.tag),
            top_k_ids=ids,
            top_k_logprobs=logprobs,
            logits=_packed(pb.logits, steps, width),
            argmax=_ints(pb.argmax),
            probs=_packed(pb.probs, steps, width),
            sampled=_ints(pb.sampled),
        )
        return result

    @classmethod
    def from_columns(cls, pb: Any) -> "list[StepResult]":
        """One result per row of a ``seqserve.v1.ResultColumns`` block (each covers one position).
        Their arrays are views of one array per column: a block is read in a call per column."""
        n, k, width = len(pb.tags), int(pb.top_k), int(pb.width)
        ids = _ints(pb.top_k_ids)
        logprobs = _floats(pb.top_k_logprobs)
        shaped: dict[str, np.ndarray | None] = {
            "top_k_ids": ids.reshape(n, 1, k) if ids is not None and k and ids.size == n * k else ids,
            "top_k_logprobs": logprobs.reshape(n, 1, k)
            if logprobs is not None and k and logprobs.size == n * k
            else logprobs,
            "logits": _packed_rows(pb.logits, n, width),
            "argmax": _ints(pb.argmax),
            "probs": _packed_rows(pb.probs, n, width),
            "sampled": _ints(pb.sampled),
        }
        present = {name: column for name, column in shaped.items() if column is not None}
        flat = tuple(name for name, column in present.items() if column.ndim == 1)  # one value per row
        new, results = object.__new__, []
        for i, (session_id, tag, position) in enumerate(zip(pb.session_ids, pb.tags, pb.positions)):
            result = new(cls)
            fields = dict.fromkeys(shaped)
            for name, column in present.items():
                fields[name] = column[i : i + 1] if name in flat else column[i]
            result.__dict__.update(fields, session_id=session_id, position=position, steps=1, width=width, tag=tag)
            results.append(result)
        return results

    @property
    def token(self) -> int | None:
        """The last position's sampled id, else its argmax, else its top-1 id (``None`` if none)."""
        for arr in (self.sampled, self.argmax):
            if arr is not None and arr.size:
                return int(arr[-1])
        if self.top_k_ids is not None and self.top_k_ids.size:
            return int(self.top_k_ids.reshape(self.top_k_ids.shape[0], -1)[-1, 0])
        return None


@dataclass(frozen=True)
class GenerateChunk:
    """Tokens produced since the previous chunk of a generation, and the position after them.

    ``finish_reason`` is set on the last chunk only: ``"length"`` (max_tokens reached) or
    ``"stop"`` (a stop sequence was produced).
    """

    tokens: np.ndarray
    position: int
    finish_reason: str | None = None


@dataclass(frozen=True)
class Classification:
    """A classifier's answer for the last consumed position."""

    label: str
    class_id: int
    probs: np.ndarray  # [classes] float32
    labels: tuple[str, ...]
    position: int

    @property
    def confidence(self) -> float:
        """Probability of the chosen class."""
        return float(self.probs[self.class_id])

    def ranked(self) -> list[tuple[str, float]]:
        """(label, probability) pairs, most likely first."""
        order = np.argsort(-self.probs, kind="stable")
        return [(self.labels[i] if i < len(self.labels) else str(i), float(self.probs[i])) for i in order]

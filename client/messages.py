"""Building protobuf messages from the SDK's Python values (shared by the sync and async clients)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np

from seqserve.v1 import seqserve_pb2 as pb

from .text import as_stop_bytes, encode_text
from .types import Classification, Output, Sampling, StepResult

__all__ = [
    "StepInput",
    "Inputs",
    "to_step_input",
    "output_spec",
    "shared_spec",
    "sampling_proto",
    "step_request",
    "generate_request",
    "finish_reason_name",
    "classification_from",
]

# What a step accepts: text (sent as its UTF-8 bytes), byte strings, token ids, or float feature
# frames shaped [n, dim] (a single frame [dim] is one step).
Inputs = Union[str, bytes, Sequence[int], Sequence[Sequence[float]], np.ndarray]


@dataclass(frozen=True)
class StepInput:
    """Normalised step input: token ids, or float32 frames ``[n, dim]``."""

    tokens: tuple[int, ...] = ()
    frames: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.frames) if self.frames is not None else len(self.tokens)

    def split(self, max_len: int) -> list["StepInput"]:
        """Consecutive pieces of at most ``max_len`` positions (one piece if it already fits)."""
        if len(self) <= max_len:
            return [self]
        if self.frames is not None:
            return [StepInput(frames=self.frames[i : i + max_len]) for i in range(0, len(self.frames), max_len)]
        return [StepInput(tokens=self.tokens[i : i + max_len]) for i in range(0, len(self.tokens), max_len)]


def to_step_input(inputs: Inputs | StepInput) -> StepInput:
    """Normalise what a caller passes to a step. Float data become feature frames, the rest token ids."""
    if isinstance(inputs, StepInput):
        return inputs
    if isinstance(inputs, str):
        return StepInput(tokens=tuple(encode_text(inputs)))
    if isinstance(inputs, (bytes, bytearray, memoryview)):
        return StepInput(tokens=tuple(bytes(inputs)))
    if type(inputs) in (list, tuple) and inputs and all(type(t) is int for t in inputs):
        # token ids as plain ints, the common case: no array round trip
        if min(inputs) < -(2**31) or max(inputs) >= 2**31:
            raise ValueError("token ids must fit in int32")
        return StepInput(tokens=tuple(inputs))  # type: ignore[arg-type]  # all ints, checked above
    arr = np.asarray(inputs)
    if arr.size == 0:
        raise ValueError("a step needs at least one token or frame")
    if arr.dtype.kind == "f":
        frames = np.ascontiguousarray(arr, dtype="<f4")
        if frames.ndim == 1:
            frames = frames.reshape(1, -1)
        if frames.ndim != 2:
            raise ValueError(f"feature frames must be shaped [n, dim], got shape {arr.shape}")
        if not np.isfinite(frames).all():
            raise ValueError("feature frames contain NaN or infinity")
        return StepInput(frames=frames)
    if arr.dtype.kind in "iub":
        if arr.ndim != 1:
            raise ValueError(f"token ids must be a flat sequence, got shape {arr.shape}")
        if arr.min() < -(2**31) or arr.max() >= 2**31:
            raise ValueError("token ids must fit in int32")
        return StepInput(tokens=tuple(int(t) for t in arr))
    raise TypeError(
        f"cannot use {type(inputs).__name__} of dtype {arr.dtype} as step input; "
        "pass text, token ids, or float frames [n, dim]"
    )


def sampling_proto(sampling: Sampling) -> pb.Sampling:
    """The ``seqserve.v1.Sampling`` message for ``sampling``."""
    msg = pb.Sampling(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    if sampling.seed is not None:
        msg.seed = sampling.seed
    return msg


def output_spec(output: Output) -> pb.OutputSpec:
    """The ``seqserve.v1.OutputSpec`` message for ``output``."""
    spec = pb.OutputSpec(
        top_k=output.top_k,
        logits=output.logits,
        argmax=output.argmax,
        probs=output.probs,
        all_positions=output.all_positions,
        none=output.none,
    )
    if output.sample is not None:
        spec.sample.CopyFrom(sampling_proto(output.sample))
    return spec


@functools.lru_cache(maxsize=256)
def shared_spec(output: Output) -> pb.OutputSpec:
    # Built once per distinct Output (a stream's steps mostly ask for the same few) and only ever
    # copied into requests, never changed.
    return output_spec(output)


def step_request(
    session_id: str, expected_position: int | None, part: StepInput, output: Output, tag: int = 0
) -> pb.StepRequest:
    """A StepRequest; ``expected_position`` None leaves it unset (no exactly-once check)."""
    req = pb.StepRequest(session_id=session_id, output=shared_spec(output), tag=tag)
    if expected_position is not None:
        req.expected_position = expected_position
    if part.frames is not None:
        req.features = part.frames.tobytes()
    else:
        req.tokens.extend(part.tokens)
    return req


def generate_request(
    session_id: str,
    expected_position: int | None,
    prompt: Inputs | None,
    max_tokens: int,
    sampling: Sampling,
    stop: str | bytes | Sequence[str | bytes] | None,
    tokens_per_message: int = 0,
) -> pb.GenerateRequest:
    """A GenerateRequest; an empty or missing prompt continues from the session's last distribution."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    req = pb.GenerateRequest(
        session_id=session_id,
        max_tokens=max_tokens,
        sampling=sampling_proto(sampling),
        stop=as_stop_bytes(stop),
        tokens_per_message=tokens_per_message,
    )
    if expected_position is not None:
        req.expected_position = expected_position
    if prompt is not None and not (isinstance(prompt, (str, bytes)) and not prompt):
        part = to_step_input(prompt)
        if part.frames is not None:
            raise ValueError("generate takes a token prompt (text or ids), not feature frames")
        req.prompt.extend(part.tokens)
    return req


_FINISH: dict[int, str] = {int(pb.FINISH_REASON_LENGTH): "length", int(pb.FINISH_REASON_STOP): "stop"}


def finish_reason_name(value: int) -> str | None:
    """``"length"``, ``"stop"``, or ``None`` for an unset finish reason."""
    return _FINISH.get(int(value))


def classification_from(result: StepResult, labels: Sequence[str]) -> Classification:
    """The classifier answer for the last position of ``result`` (which must carry probs)."""
    if result.probs is None:
        raise ValueError("the step returned no class probabilities")
    probs = np.asarray(result.probs, dtype=np.float32).reshape(-1, result.width or len(labels) or 1)[-1]
    class_id = int(np.argmax(probs))
    names = tuple(labels) if len(labels) == probs.size else tuple(str(i) for i in range(probs.size))
    return Classification(
        label=names[class_id], class_id=class_id, probs=probs.copy(), labels=names, position=result.position
    )

"""The engine's vocabulary: what it takes and what it returns, as plain typed objects.

No protobuf and no gRPC here or anywhere below the API layer: server/api/ converts
``seqserve.v1`` messages into these and back, and a second front end (KServe v2) converts its own
messages into the same objects. Hot-path objects use ``__slots__`` classes rather than frozen
dataclasses, whose constructors cost several times more per step.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sampling:
    """How to draw a token: temperature 0 is greedy; top_k 0 and top_p 0 (or 1) do not truncate."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int | None = None


@dataclass(frozen=True)
class OutputSpec:
    """What a step asks for (see the OutputSpec message in proto/). Hashable: part of a retry's key."""

    top_k: int = 0
    logits: bool = False
    argmax: bool = False
    probs: bool = False
    sample: Sampling | None = None
    all_positions: bool = False
    none: bool = False


class StepRequest:
    """One step for one session: token ids or packed float32 frames, and what to return."""

    __slots__ = ("session_id", "tokens", "features", "output", "expected_position", "tag")

    def __init__(
        self,
        session_id: str,
        tokens: Sequence[int] = (),
        features: bytes = b"",
        output: OutputSpec | None = None,
        expected_position: int | None = None,
        tag: int = 0,
    ):
        self.session_id = session_id
        self.tokens = tokens
        self.features = features
        self.output = output  # None: the model's default (same as an empty OutputSpec)
        self.expected_position = expected_position
        self.tag = tag


class StepBlock:
    """Steps of token-id models asking for the same ``output``, column by column (PackedSteps'
    StepColumns): row i is ``session_ids[i]`` fed its tokens with ``tags[i]``. ``expected``: one
    expected position per row, or None (no row carries one); ``lengths``: tokens per row, or None
    (one token each). Columns that disagree in length are refused (requests.check_block)."""

    __slots__ = ("session_ids", "tags", "expected", "tokens", "lengths", "output")

    def __init__(
        self,
        session_ids: Sequence[str],
        tags: Sequence[int],
        tokens: Sequence[int],
        expected: Sequence[int] | None = None,
        lengths: Sequence[int] | None = None,
        output: OutputSpec | None = None,
    ):
        self.session_ids = session_ids
        self.tags = tags
        self.tokens = tokens
        self.expected = expected
        self.lengths = lengths
        self.output = output

    def requests(self) -> list[StepRequest]:
        """The block as one StepRequest per row (columns checked already)."""
        ids, tags, expected, tokens, lengths = self.session_ids, self.tags, self.expected, self.tokens, self.lengths
        reqs = []
        end = 0
        for i, sid in enumerate(ids):
            start, end = end, end + (lengths[i] if lengths is not None else 1)
            reqs.append(
                StepRequest(
                    sid,
                    tuple(tokens[start:end]),
                    b"",
                    self.output,
                    expected[i] if expected is not None else None,
                    tags[i],
                )
            )
        return reqs


@dataclass
class GenerateRequest:
    """Server-side sampling on a language-model session."""

    session_id: str
    max_tokens: int
    prompt: Sequence[int] = ()
    sampling: Sampling = field(default_factory=Sampling)
    stops: Sequence[bytes] = ()
    tokens_per_message: int = 0  # 0: the server's setting
    expected_position: int | None = None


class StepOutput:
    """A step's answer. ``values`` maps output names (top_k_ids, top_k_logprobs, logits, argmax,
    probs, sampled) to lists of numbers or packed little-endian float32 bytes."""

    __slots__ = ("session_id", "tag", "position", "steps", "width", "values")

    def __init__(self, session_id: str, tag: int, position: int, steps: int, width: int, values: dict):
        self.session_id = session_id
        self.tag = tag
        self.position = position  # the session's position after the step
        self.steps = steps  # positions the values cover (0 when nothing but the position was asked)
        self.width = width
        self.values = values

    def retagged(self, tag: int) -> StepOutput:
        """The same answer to a request with another tag (a retry)."""
        if tag == self.tag:
            return self
        return StepOutput(self.session_id, tag, self.position, self.steps, self.width, self.values)


class StepAnswers:
    """The answers of several steps that ran together and asked for the same outputs, column by
    column: row i belongs to the i-th step. One object per run and output plan instead of one
    StepOutput per step: a sink that sends many answers in one message takes the columns whole
    (PackedStepStream), the others take ``outputs`` (one StepOutput per row).

    ``columns`` maps output names to numpy arrays with one row per step: top_k_ids and
    top_k_logprobs [rows, k], logits and probs [rows, width] float32, argmax and sampled [rows].
    ``steps`` is the positions each answer covers: 1, or 0 when nothing but the position was asked.
    """

    __slots__ = ("session_ids", "tags", "positions", "steps", "width", "columns")

    def __init__(self, session_ids: list[str], tags: list[int], positions: list[int], steps: int, width: int, columns):
        self.session_ids = session_ids
        self.tags = tags
        self.positions = positions  # each session's position after its step
        self.steps = steps
        self.width = width
        self.columns = columns

    def __len__(self) -> int:
        return len(self.tags)

    def outputs(self, rows: list[int] | None = None) -> list[StepOutput]:
        """One StepOutput per row (``rows``: these rows only, in this order)."""
        pick = range(len(self.tags)) if rows is None else rows
        ids, tags, positions, width, columns = self.session_ids, self.tags, self.positions, self.width, self.columns
        if not columns:
            steps = self.steps
            return [StepOutput(ids[i], tags[i], positions[i], steps, 0, {}) for i in pick]
        # whole columns to Python values at once (a call per column, not per value)
        top = columns.get("top_k_ids")
        if top is not None and len(columns) == 2:  # the default outputs, on the single-session latency path
            lps = columns["top_k_logprobs"]
            if rows is not None:
                top, lps = top[rows], lps[rows]
            top, lps = top.tolist(), lps.tolist()
            return [
                StepOutput(ids[i], tags[i], positions[i], 1, width, {"top_k_ids": top[n], "top_k_logprobs": lps[n]})
                for n, i in enumerate(pick)
            ]
        lists = {}
        for name, column in columns.items():
            chosen = column if rows is None else column[rows]
            if name in PACKED_OUTPUTS:
                lists[name] = [row.tobytes() for row in chosen]
            elif chosen.ndim == 1:
                lists[name] = [[v] for v in chosen.tolist()]
            else:
                lists[name] = chosen.tolist()
        return [
            StepOutput(ids[i], tags[i], positions[i], 1, width, {k: v[n] for k, v in lists.items()})
            for n, i in enumerate(pick)
        ]

    def output(self, row: int, tag: int) -> StepOutput:
        """Row ``row``'s answer, to a request with ``tag`` (a resend of that step)."""
        return self.outputs([row])[0].retagged(tag)


PACKED_OUTPUTS = ("logits", "probs")  # outputs sent as little-endian float32 bytes, not number lists


class FinishReason(enum.Enum):
    LENGTH = 1  # max_tokens reached
    STOP = 2  # a stop sequence was produced


class GenerateChunk:
    """Tokens produced since the previous chunk; the last chunk carries the finish reason."""

    __slots__ = ("tokens", "position", "finish")

    def __init__(self, tokens: list[int], position: int, finish: FinishReason | None = None):
        self.tokens = tokens
        self.position = position
        self.finish = finish


@dataclass(frozen=True)
class SessionView:
    """What a caller may know of a session."""

    session_id: str
    model: str
    version: int
    position: int
    created_unix_ms: int
    last_used_unix_ms: int
    expires_unix_ms: int  # 0: never expires
    generating: bool


@dataclass(frozen=True)
class ModelFacts:
    """Key facts of a served model (its latest version) and the server's limits for it."""

    name: str
    version: int
    versions: list[int]
    kind: str
    cell: str
    layers: int
    hidden_size: int
    input_kind: str
    input_dim: int
    output_size: int
    labels: list[str]
    state_bytes_per_session: int
    metrics_json: str
    max_tokens_per_step: int
    max_generate_tokens: int

"""``seqserve.v1`` messages to the engine's domain objects (domain.py) and back.

The step path runs once per step, so the conversions build no more than they must: a request's
token ids are passed through as the message's own repeated field, and an answer becomes one
StepResult constructor call.
"""

from __future__ import annotations

import operator

from seqserve.v1 import seqserve_pb2 as pb

from ..domain import (
    PACKED_OUTPUTS,
    FinishReason,
    GenerateChunk,
    GenerateRequest,
    ModelFacts,
    OutputSpec,
    Sampling,
    SessionView,
    StepAnswers,
    StepBlock,
    StepOutput,
    StepRequest,
)
from ..errors import ServeError
from .status import error_message

_FINISH = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
}


def sampling(msg: pb.Sampling) -> Sampling:
    return Sampling(msg.temperature, msg.top_k, msg.top_p, msg.seed if msg.HasField("seed") else None)


def output_spec(msg: pb.OutputSpec) -> OutputSpec:
    return OutputSpec(
        msg.top_k,
        msg.logits,
        msg.argmax,
        msg.probs,
        sampling(msg.sample) if msg.HasField("sample") else None,
        msg.all_positions,
        msg.none,
    )


# OutputSpec by its fields: a client asks the same few again and again
_SPECS: dict[object, OutputSpec] = {}
# every OutputSpec field but the message `sample` (tests/test_proto.py checks none is missing)
SPEC_SCALARS = ("top_k", "logits", "argmax", "probs", "all_positions", "none")
_scalar_fields = operator.attrgetter(*SPEC_SCALARS)
_MAX_SPECS = 1024


def cached_output_spec(msg: pb.OutputSpec) -> OutputSpec:
    """``output_spec(msg)``, converted once per distinct spec (a step's spec is read per step)."""
    key: object
    if msg.HasField("sample"):
        key = msg.SerializeToString(deterministic=True)
    else:  # the usual spec: its scalar fields are a cheaper key than its wire form
        key = _scalar_fields(msg)
    spec = _SPECS.get(key)
    if spec is None:
        spec = output_spec(msg)
        if len(_SPECS) < _MAX_SPECS:  # bounded: a client making up specs cannot grow it without end
            _SPECS[key] = spec
    return spec


def step_request(msg: pb.StepRequest) -> StepRequest:
    return StepRequest(
        msg.session_id,
        msg.tokens,
        msg.features,
        cached_output_spec(msg.output) if msg.HasField("output") else None,
        msg.expected_position if msg.HasField("expected_position") else None,
        msg.tag,
    )


def step_block(msg: pb.StepColumns) -> StepBlock:
    """A StepColumns block, its columns as lists (one C-level copy each, no message per step)."""
    return StepBlock(
        list(msg.session_ids),
        list(msg.tags),
        list(msg.tokens),
        list(msg.expected_positions) or None,
        list(msg.lengths) or None,
        cached_output_spec(msg.output) if msg.HasField("output") else None,
    )


def generate_request(msg: pb.GenerateRequest) -> GenerateRequest:
    return GenerateRequest(
        session_id=msg.session_id,
        max_tokens=msg.max_tokens,
        prompt=msg.prompt,
        sampling=sampling(msg.sampling),
        stops=list(msg.stop),
        tokens_per_message=msg.tokens_per_message,
        expected_position=msg.expected_position if msg.HasField("expected_position") else None,
    )


def step_result(out: StepOutput) -> pb.StepResult:
    return pb.StepResult(
        session_id=out.session_id, tag=out.tag, position=out.position, steps=out.steps, width=out.width, **out.values
    )


def add_step_result(results, out: StepOutput) -> None:
    """Append ``out`` to a repeated StepResult field (built in place: no copy of the message)."""
    results.add(
        session_id=out.session_id, tag=out.tag, position=out.position, steps=out.steps, width=out.width, **out.values
    )


def add_columns(blocks, answers: StepAnswers, rows: list[int] | None) -> None:
    """Append the ``rows`` of ``answers`` (None: all) to a repeated ResultColumns field, as one
    block: a call per column, not a message per step."""
    columns = answers.columns
    block = blocks.add(width=answers.width)
    if rows is None:
        block.session_ids.extend(answers.session_ids)
        block.tags.extend(answers.tags)
        block.positions.extend(answers.positions)
    else:
        block.session_ids.extend([answers.session_ids[i] for i in rows])
        block.tags.extend([answers.tags[i] for i in rows])
        block.positions.extend([answers.positions[i] for i in rows])
    for name, column in columns.items():
        values = column if rows is None else column[rows]
        if name in PACKED_OUTPUTS:
            setattr(block, name, values.astype("<f4", copy=False).tobytes())
        else:
            if name == "top_k_ids":
                block.top_k = values.shape[1]
            getattr(block, name).extend(values.ravel().tolist())


def error_result(session_id: str, tag: int, err: ServeError) -> pb.StepResult:
    return pb.StepResult(session_id=session_id, tag=tag, error=error_message(err))


def generate_response(chunk: GenerateChunk) -> pb.GenerateResponse:
    return pb.GenerateResponse(tokens=chunk.tokens, position=chunk.position, finish_reason=_FINISH[chunk.finish])


def session_info(view: SessionView) -> pb.SessionInfo:
    return pb.SessionInfo(
        session_id=view.session_id,
        model=view.model,
        version=view.version,
        position=view.position,
        created_unix_ms=view.created_unix_ms,
        last_used_unix_ms=view.last_used_unix_ms,
        expires_unix_ms=view.expires_unix_ms,
        generating=view.generating,
    )


def model_list(models: list[ModelFacts]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(models=[pb.ModelInfo(**vars(m)) for m in models])

"""``seqserve.v1`` messages to the engine's domain objects (domain.py) and back.

The step path runs once per step, so the conversions build no more than they must: a request's
token ids are passed through as the message's own repeated field, and an answer becomes one
StepResult constructor call.
"""

from __future__ import annotations

from seqserve.v1 import seqserve_pb2 as pb

from ..domain import (
    FinishReason,
    GenerateChunk,
    GenerateRequest,
    ModelFacts,
    OutputSpec,
    Sampling,
    SessionView,
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


_SPECS: dict[bytes, OutputSpec] = {}  # OutputSpec by its wire form: a client asks the same few again and again
_MAX_SPECS = 1024


def cached_output_spec(msg: pb.OutputSpec) -> OutputSpec:
    """``output_spec(msg)``, converted once per distinct spec (a step's spec is read per step)."""
    key = msg.SerializeToString(deterministic=True)
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

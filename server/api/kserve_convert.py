"""KServe v2 / Triton messages (``seqserve.kserve``, proto package ``inference``) to the engine's
domain objects and back.

A model appears to Triton clients as its ONNX graph does, less the state (which the server keeps):
one input, the manifest's ``tokens`` (INT64, shape [1, n]) or ``features`` (FP32, [1, n, dim]),
and the per-position ``logits`` (FP32, [1, n, width]); a classifier also offers ``probs``, the
softmax of its logits. The leading 1 is the batch: the model config says ``max_batch_size`` > 0,
so requests carry that dimension, and as under Triton's sequence batcher each request is one
sequence's step. Refusals are ServeErrors with the native reasons; where Triton words an error,
the message uses its wording.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from seqserve.kserve import grpc_service_pb2 as pb
from seqserve.kserve import model_config_pb2 as mc

from ..domain import OutputSpec, StepOutput, StepRequest
from ..errors import Reason, ServeError, invalid, not_found

PLATFORM, BACKEND = "onnxruntime_onnx", "onnxruntime"
_OutputTensor = pb.ModelInferResponse.InferOutputTensor


class ServedModel:
    """One model version as the KServe API shows it, with what each request needs precomputed."""

    __slots__ = (
        "model",
        "name",
        "version",
        "version_str",
        "tokens",
        "input_name",
        "datatype",
        "dims",
        "rank",
        "outputs",
        "all_outputs",
        "specs",
        "templates",
    )

    def __init__(self, model: Any):
        m = model.manifest
        self.model = model
        self.name, self.version, self.version_str = model.name, model.version, str(model.version)
        self.tokens = model.tokens
        self.input_name = m.input_name
        self.datatype = "INT64" if model.tokens else "FP32"
        self.dims = [-1] if model.tokens else [-1, m.input_dim]  # per request, after the batch dimension
        self.rank = 1 + len(self.dims)
        # output name -> the StepOutput value that holds it
        self.outputs = {m.logits_name: "logits"}
        if m.kind == "classifier":
            self.outputs["probs"] = "probs"
        self.all_outputs = tuple(self.outputs)  # a request that names no output gets them all
        self.specs: dict[tuple, OutputSpec] = {}  # (output names, several positions) -> what to compute
        self.templates: dict[tuple, bytes] = {}  # (output names, positions, stream) -> serialized answer head

    @property
    def width(self) -> int:
        return self.model.width

    def tensor_metadata(self) -> tuple[list, list]:
        inputs = [
            pb.ModelMetadataResponse.TensorMetadata(
                name=self.input_name, datatype=self.datatype, shape=[-1, *self.dims]
            )
        ]
        outputs = [
            pb.ModelMetadataResponse.TensorMetadata(name=name, datatype="FP32", shape=[-1, -1, self.width])
            for name in self.outputs
        ]
        return inputs, outputs


def parse_version(name: str, version: str) -> int:
    """A request's model_version: empty is the latest (0), else a version number."""
    if not version:
        return 0
    if not version.isdigit():
        raise not_found(
            Reason.MODEL_NOT_FOUND, f"model '{name}' has no version '{version[:40]}' (versions are numbers)", model=name
        )
    return int(version)


# -- sequences -------------------------------------------------------------------------------------
def sequence_control(params: Any, model: str) -> tuple[int | str, bool, bool]:
    """``(sequence_id, start, end)`` from a request's parameters; every model is stateful, so a
    request without a sequence id is refused, as Triton refuses it for a sequence-batched model."""
    get = params.get
    p = get("sequence_id")
    if p is None:
        raise _no_correlation_id(model)
    kind = p.WhichOneof("parameter_choice")
    if kind == "int64_param":
        sequence_id: int | str = p.int64_param
    elif kind == "string_param":
        sequence_id = p.string_param
    else:
        raise invalid(
            Reason.INVALID_SEQUENCE_ID,
            f"sequence_id must be an int64 or a string parameter, got {kind or 'no value'}",
            model=model,
        )
    if not sequence_id:
        raise _no_correlation_id(model)
    return sequence_id, _flag(get("sequence_start"), "sequence_start"), _flag(get("sequence_end"), "sequence_end")


def _flag(p: Any, name: str) -> bool:
    if p is None:
        return False
    if p.WhichOneof("parameter_choice") != "bool_param":
        raise invalid(Reason.INVALID_PARAMETER, f"parameter '{name}' must be a bool_param", parameter=name)
    return p.bool_param


def _no_correlation_id(model: str) -> ServeError:
    return invalid(
        Reason.INVALID_SEQUENCE_ID,
        f"inference request to model '{model}' must specify a non-zero or non-empty correlation ID "
        "(parameter sequence_id, with sequence_start on a sequence's first request)",
        model=model,
    )


# -- requests --------------------------------------------------------------------------------------
def step_request(msg: Any, sm: ServedModel, session_id: str, tag: int = 0) -> tuple[StepRequest, tuple[str, ...]]:
    """The engine's step for a ModelInferRequest on ``session_id``, and the output names to answer."""
    names = _names(sm, msg)
    tokens, features, positions = _input(msg, sm)
    return StepRequest(session_id, tokens, features, _spec(sm, names, positions), None, tag), names


def _input(msg: Any, sm: ServedModel) -> tuple[Any, bytes, int]:
    """``(tokens, features, positions)`` of the request's one input, checked against the model."""
    inputs = msg.inputs
    if len(inputs) != 1 or inputs[0].name != sm.input_name:
        got = ", ".join(f"'{t.name}'" for t in inputs) or "none"
        raise _tensor(sm, sm.input_name, f"model '{sm.name}' takes one input, '{sm.input_name}'; got {got}")
    t = inputs[0]
    if t.datatype != sm.datatype:
        raise _tensor(
            sm,
            t.name,
            f"inference input '{t.name}' data-type is '{t.datatype}', but model '{sm.name}' expects '{sm.datatype}'",
        )
    shape = list(t.shape)
    if len(shape) != sm.rank or min(shape) < 0 or (not sm.tokens and shape[2] != sm.dims[1]):
        raise _tensor(
            sm,
            t.name,
            f"unexpected shape for input '{t.name}' for model '{sm.name}'. Expected {[-1, *sm.dims]}, got {shape}",
        )
    if shape[0] != 1:
        raise _tensor(
            sm,
            t.name,
            f"inference request to model '{sm.name}' must specify batch-size 1 due to requirements of sequence "
            f"batcher (one request is one step of one sequence), got {shape[0]}",
        )
    positions = shape[1]
    count = positions if sm.tokens else positions * shape[2]
    raw = msg.raw_input_contents
    if raw:
        if t.HasField("contents"):
            raise _tensor(
                sm,
                t.name,
                f"contents field must not be specified when using raw_input_contents for '{t.name}' "
                f"for model '{sm.name}'",
            )
        if len(raw) != 1:
            raise _tensor(sm, t.name, f"expected 1 raw_input_contents entry (one per input), got {len(raw)}")
        data = raw[0]
        size = count * (8 if sm.tokens else 4)
        if len(data) != size:
            raise _tensor(sm, t.name, f"unexpected total byte size {len(data)} for input '{t.name}', expecting {size}")
        if not sm.tokens:
            return (), data, positions
        if count == 1:  # the common step: one token
            return (int.from_bytes(data, "little", signed=True),), b"", 1
        return np.frombuffer(data, "<i8").tolist(), b"", positions
    values = t.contents.int64_contents if sm.tokens else t.contents.fp32_contents
    if len(values) != count:
        where = "int64_contents" if sm.tokens else "fp32_contents"
        raise _tensor(
            sm,
            t.name,
            f"input '{t.name}' has shape {shape}, so {count} values, but {where} holds {len(values)} "
            "(send the data in raw_input_contents or in the contents field of the input's datatype)",
        )
    if sm.tokens:
        return values, b"", positions
    return (), np.asarray(values, "<f4").tobytes(), positions


def _names(sm: ServedModel, msg: Any) -> tuple[str, ...]:
    if not msg.outputs:
        return sm.all_outputs
    names = tuple(o.name for o in msg.outputs)
    for name in names:
        if name not in sm.outputs:
            raise _tensor(
                sm,
                name,
                f"unexpected inference output '{name}' for model '{sm.name}' (it has {', '.join(sm.outputs)})",
            )
    return names


def _spec(sm: ServedModel, names: tuple[str, ...], positions: int) -> OutputSpec:
    """What the engine computes: the values behind ``names``, at every position (for one position
    the last, which is the same and takes the batched path)."""
    key = (names, positions > 1)
    spec = sm.specs.get(key)
    if spec is None:
        wanted = {sm.outputs[name] for name in names}
        spec = sm.specs[key] = OutputSpec(logits="logits" in wanted, probs="probs" in wanted, all_positions=key[1])
    return spec


def _tensor(sm: ServedModel, tensor: str, message: str) -> ServeError:
    return invalid(Reason.INVALID_TENSOR, message, model=sm.name, tensor=tensor)


# -- answers ---------------------------------------------------------------------------------------
def infer_response(sm: ServedModel, request_id: str, names: tuple[str, ...], out: StepOutput) -> Any:
    """A ModelInferResponse: the tensors' description from a template made once per output names and
    length (parsing it is several times cheaper than building the nested messages per step)."""
    msg = pb.ModelInferResponse.FromString(_template(sm, names, out.steps, False))
    _fill(msg, sm, request_id, names, out)
    return msg


def stream_response(sm: ServedModel, request_id: str, names: tuple[str, ...], out: StepOutput) -> Any:
    """The same as ModelStreamInfer's answer, built in place (no copy into the wrapper)."""
    msg = pb.ModelStreamInferResponse.FromString(_template(sm, names, out.steps, True))
    _fill(msg.infer_response, sm, request_id, names, out)
    return msg


def _fill(msg: Any, sm: ServedModel, request_id: str, names: tuple[str, ...], out: StepOutput) -> None:
    if request_id:
        msg.id = request_id
    values, keys = out.values, sm.outputs
    msg.raw_output_contents.extend([values[keys[name]] for name in names])


def _template(sm: ServedModel, names: tuple[str, ...], steps: int, stream: bool) -> bytes:
    key = (names, steps, stream)
    raw = sm.templates.get(key)
    if raw is None:
        shape = (1, steps, sm.width)
        response = pb.ModelInferResponse(
            model_name=sm.name,
            model_version=sm.version_str,
            outputs=[_OutputTensor(name=name, datatype="FP32", shape=shape) for name in names],
        )
        message = pb.ModelStreamInferResponse(infer_response=response) if stream else response
        raw = message.SerializeToString()
        if len(sm.templates) < 1024:  # lengths vary; the common ones stay cached
            sm.templates[key] = raw
    return raw


def model_metadata(sm: ServedModel, versions: list[int]) -> Any:
    inputs, outputs = sm.tensor_metadata()
    return pb.ModelMetadataResponse(
        name=sm.name, versions=[str(v) for v in versions], platform=PLATFORM, inputs=inputs, outputs=outputs
    )


def model_config(sm: ServedModel, max_batch_size: int, idle_ttl_s: float) -> Any:
    m = sm.model.manifest
    params = {
        "kind": m.kind,
        "cell": m.cell,
        "layers": str(m.layers),
        "hidden_size": str(m.hidden_size),
        "input_kind": m.input_kind,
        "state_bytes_per_session": str(m.state_bytes_per_session()),
    }
    if m.labels:
        params["labels"] = json.dumps(list(m.labels))
    dtype = mc.TYPE_INT64 if sm.tokens else mc.TYPE_FP32
    return pb.ModelConfigResponse(
        config=mc.ModelConfig(
            name=sm.name,
            platform=PLATFORM,
            backend=BACKEND,
            version_policy=mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All()),
            max_batch_size=max_batch_size,
            input=[mc.ModelInput(name=sm.input_name, data_type=dtype, dims=sm.dims)],
            output=[mc.ModelOutput(name=name, data_type=mc.TYPE_FP32, dims=[-1, sm.width]) for name in sm.outputs],
            # Its presence marks the model stateful. The state stays in the server (no control
            # inputs, no state tensors); an idle sequence's session expires after idle_ttl_s
            # (0: never, where Triton would read 0 as its 1 s default).
            sequence_batching=mc.ModelSequenceBatching(
                direct=mc.ModelSequenceBatching.StrategyDirect(),
                max_sequence_idle_microseconds=int(idle_ttl_s * 1_000_000),
            ),
            parameters={k: mc.ModelParameter(string_value=v) for k, v in params.items()},
        )
    )

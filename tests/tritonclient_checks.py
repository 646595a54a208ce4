"""Drive a seqserve server with Triton's own Python client (tritonclient.grpc) and print what it saw.

Run by tests/test_kserve_tritonclient.py as ``python tests/tritonclient_checks.py ADDRESS PLAN`` (or
``... wire``, which prints the wire shape of tritonclient's own copy of the protocol), in a process of its own: tritonclient and seqserve's server both register protobuf messages named
``inference.*``, which protobuf refuses to hold twice in one process (docs/triton-compat.md). The
plan (JSON) says which steps to send; the output (JSON on stdout) holds the answers as tritonclient
decoded them, for the test to compare with the native API's.
"""

from __future__ import annotations

import json
import queue
import sys

import numpy as np


def wire_shape(files) -> dict:
    """Every message's fields (number, type, label, type name) and every method's types, by full
    name, of protobuf file descriptors ``files``: what must match for two copies to interoperate."""
    shape: dict = {}

    def repeated(f) -> bool:
        return f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED

    def visit(message) -> None:
        shape[message.full_name] = {
            f.name: [
                f.number,
                f.type,
                repeated(f),
                (f.message_type or f.enum_type).full_name if f.type in (11, 14) else "",
            ]
            for f in message.fields
        }
        for nested in message.nested_types:
            if not nested.GetOptions().map_entry:
                visit(nested)

    for fd in files:
        for message in fd.message_types_by_name.values():
            visit(message)
        for service in fd.services_by_name.values():
            for m in service.methods:
                shape[f"{service.full_name}.{m.name}"] = {
                    "rpc": [m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming]
                }
    return shape


def tokens_input(tokens: list[int], datatype: str = "INT64", shape: list[int] | None = None):
    import tritonclient.grpc as grpcclient

    data = np.array([tokens], np.int64 if datatype == "INT64" else np.int32)
    if shape is not None:
        data = data.reshape(shape)
    inp = grpcclient.InferInput("tokens", list(data.shape), datatype)
    inp.set_data_from_numpy(data)
    return inp


def failure(call) -> dict:
    from tritonclient.utils import InferenceServerException

    try:
        call()
    except InferenceServerException as exc:
        return {"status": exc.status(), "message": exc.message()}
    return {"status": None, "message": "no error"}


def run(address: str, plan: dict) -> dict:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(address)
    model = plan["model"]
    out: dict = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "unknown_model_ready": client.is_model_ready("no-such-model"),
        "server_metadata": client.get_server_metadata(as_json=True),
        "metadata": client.get_model_metadata(model, as_json=True),
        "config": client.get_model_config(model, as_json=True),
    }

    # one sequence stepped with infer(), for each kind of id
    for name, sequence_id in (("int_id", plan["int_id"]), ("string_id", plan["string_id"])):
        steps = plan["steps"]
        logits = []
        for i, tokens in enumerate(steps):
            result = client.infer(
                model,
                [tokens_input(tokens)],
                outputs=[grpcclient.InferRequestedOutput("logits")],
                request_id=f"{name}-{i}",
                sequence_id=sequence_id,
                sequence_start=i == 0,
                sequence_end=i == len(steps) - 1,
            )
            assert result.get_response().id == f"{name}-{i}"
            logits.append(result.as_numpy("logits").tolist())
        out[name] = logits

    # several sequences interleaved on one stream, answers told apart by id
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    streams = plan["stream"]  # {sequence id: [steps]}
    rounds = max(len(steps) for steps in streams.values())
    sent = 0
    for r in range(rounds):
        for sid, steps in streams.items():
            if r < len(steps):
                client.async_stream_infer(
                    model,
                    [tokens_input(steps[r])],
                    request_id=f"{sid}/{r}",
                    sequence_id=int(sid),
                    sequence_start=r == 0,
                    sequence_end=r == len(steps) - 1,
                )
                sent += 1
    # an error in the middle of the stream: a sequence that was never started, then a good request
    client.async_stream_infer(model, [tokens_input([1])], request_id="orphan", sequence_id=plan["orphan_id"])
    client.async_stream_infer(
        model,
        [tokens_input([5])],
        request_id="after-error",
        sequence_id=plan["orphan_id"],
        sequence_start=True,
        sequence_end=True,
    )
    stream_logits: dict = {}
    stream_errors = []
    for _ in range(sent + 2):
        result, error = answers.get(timeout=30)
        if error is not None:
            stream_errors.append(str(error))
        else:
            stream_logits[result.get_response().id] = result.as_numpy("logits").tolist()
    client.stop_stream()
    out["stream"] = stream_logits
    out["stream_errors"] = stream_errors

    # refusals
    out["missing_start"] = failure(lambda: client.infer(model, [tokens_input([1])], sequence_id=plan["orphan_id"] + 1))
    out["unknown_model"] = failure(
        lambda: client.infer("no-such-model", [tokens_input([1])], sequence_id=9, sequence_start=True)
    )
    out["wrong_datatype"] = failure(
        lambda: client.infer(model, [tokens_input([1], "INT32")], sequence_id=9, sequence_start=True)
    )
    out["wrong_shape"] = failure(
        lambda: client.infer(model, [tokens_input([1, 2], shape=[2, 1])], sequence_id=9, sequence_start=True)
    )
    out["no_sequence_id"] = failure(lambda: client.infer(model, [tokens_input([1])]))
    out["statistics"] = client.get_inference_statistics(model, as_json=True)
    client.close()
    return out


if __name__ == "__main__":
    if sys.argv[1] == "wire":
        from tritonclient.grpc import model_config_pb2, service_pb2

        print(json.dumps(wire_shape([service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR])))
    else:
        print(json.dumps(run(sys.argv[1], json.loads(sys.argv[2]))))

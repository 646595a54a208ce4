"""The KServe v2 / Triton endpoint over the raw generated stubs: what tritonclient never sends
(typed contents, features, classifier probabilities), sequence life cycles, refusals with their
reasons, and the sharing of limits, TTL and health with the native API. Triton's own client is
exercised in test_kserve_tritonclient.py."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from seqserve.kserve import grpc_service_pb2 as kp
from seqserve.kserve import grpc_service_pb2_grpc as kg
from seqserve.server.api.app import ServerThread
from seqserve.server.config import ServerConfig
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc


def infer_request(
    model="lm-lstm", tokens=(1,), seq=1, start=False, end=False, rid="", raw=True, outputs=(), features=None
) -> kp.ModelInferRequest:
    r = kp.ModelInferRequest(model_name=model, id=rid)
    if seq is not None:
        if isinstance(seq, str):
            r.parameters["sequence_id"].string_param = seq
        else:
            r.parameters["sequence_id"].int64_param = seq
    r.parameters["sequence_start"].bool_param = start
    r.parameters["sequence_end"].bool_param = end
    if features is not None:
        x = np.asarray(features, np.float32)
        t = r.inputs.add(name="features", datatype="FP32", shape=[1, *x.shape])
        if raw:
            r.raw_input_contents.append(x.astype("<f4").tobytes())
        else:
            t.contents.fp32_contents.extend(x.ravel().tolist())
    else:
        t = r.inputs.add(name="tokens", datatype="INT64", shape=[1, len(tokens)])
        if raw:
            r.raw_input_contents.append(np.asarray(tokens, "<i8").tobytes())
        else:
            t.contents.int64_contents.extend(tokens)
    for name in outputs:
        r.outputs.add(name=name)
    return r


def output(resp: kp.ModelInferResponse, name: str) -> np.ndarray:
    i = [o.name for o in resp.outputs].index(name)
    o = resp.outputs[i]
    assert o.datatype == "FP32" and not o.HasField("contents")
    return np.frombuffer(resp.raw_output_contents[i], "<f4").reshape(list(o.shape))


def refusal(call) -> tuple[grpc.StatusCode, str, str]:
    """(code, message, ErrorInfo reason) of a failed unary call."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    status = rpc_status.from_call(caught.value)
    info = error_details_pb2.ErrorInfo()
    assert status is not None and status.details[0].Unpack(info)
    return caught.value.code(), caught.value.details(), info.reason


@pytest.fixture(scope="module")
def served(tiny_models):
    models_dir, _ = tiny_models
    with (
        ServerThread(ServerConfig(models=str(models_dir), port=0, metrics_port=0, device="cpu")) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        yield server, kg.GRPCInferenceServiceStub(channel), pb_grpc.SeqServeStub(channel)


def native_step(stub, sid, **step):
    return stub.Step(
        pb.StepRequest(session_id=sid, output=pb.OutputSpec(logits=True, probs=True, all_positions=True), **step)
    )


def test_typed_contents_equal_raw_contents(served):
    _, k, _ = served
    steps = [[3, 4, 5], [6]]
    answers = {}
    for raw, seq in ((True, 11), (False, 12)):
        answers[raw] = [
            output(k.ModelInfer(infer_request(tokens=t, seq=seq, start=i == 0, end=i == 1, raw=raw)), "logits")
            for i, t in enumerate(steps)
        ]
    for a, b in zip(answers[True], answers[False]):
        assert a.shape[:2] == b.shape[:2] and np.array_equal(a, b)


def test_features_and_class_probabilities_match_the_native_api(served):
    _, k, n = served
    rng = np.random.default_rng(0)
    frames = [rng.standard_normal((3, 8)), rng.standard_normal((1, 8))]
    sid = n.CreateSession(pb.CreateSessionRequest(model="feat-gru")).session_id
    for i, x in enumerate(frames):
        resp = k.ModelInfer(
            infer_request("feat-gru", seq="f-1", start=i == 0, end=i == 1, features=x, raw=i == 0, rid=f"q{i}")
        )
        assert resp.id == f"q{i}" and resp.model_name == "feat-gru" and resp.model_version == "1"
        assert [o.name for o in resp.outputs] == ["logits", "probs"]  # a classifier offers both
        want = native_step(n, sid, features=x.astype("<f4").tobytes())
        np.testing.assert_array_equal(output(resp, "logits").ravel(), np.frombuffer(want.logits, "<f4"))
        np.testing.assert_array_equal(output(resp, "probs").ravel(), np.frombuffer(want.probs, "<f4"))
        assert output(resp, "probs").shape == (1, len(x), 10)
    only = k.ModelInfer(infer_request("cls-lstm", tokens=[1, 2], seq=5, start=True, end=True, outputs=["probs"]))
    assert [o.name for o in only.outputs] == ["probs"] and len(only.raw_output_contents) == 1
    np.testing.assert_allclose(output(only, "probs").sum(axis=-1), 1.0, atol=1e-5)


def test_start_on_a_running_sequence_restarts_it(served):
    _, k, _ = served
    first = output(k.ModelInfer(infer_request(tokens=[9], seq="r", start=True)), "logits")
    second = output(k.ModelInfer(infer_request(tokens=[9], seq="r")), "logits")
    assert not np.array_equal(first, second)  # the state moved on
    again = output(k.ModelInfer(infer_request(tokens=[9], seq="r", start=True, end=True)), "logits")
    np.testing.assert_array_equal(again, first)


def test_int_and_string_ids_are_different_sequences(served):
    _, k, _ = served
    k.ModelInfer(infer_request(seq=5150, start=True))
    code, message, reason = refusal(lambda: k.ModelInfer(infer_request(seq="5150")))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "SEQUENCE_NOT_STARTED")
    k.ModelInfer(infer_request(seq=5150, end=True))


def test_end_closes_the_session_and_the_id_is_free(served):
    server, k, _ = served
    count = lambda: server.call(lambda: len(server.engine.table.sessions))  # noqa: E731
    before = count()
    k.ModelInfer(infer_request(seq=31, start=True))
    assert count() == before + 1
    k.ModelInfer(infer_request(seq=31, end=True))
    deadline = time.monotonic() + 5  # the close is queued on the server's loop right after the answer
    while count() != before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert count() == before
    _, message, reason = refusal(lambda: k.ModelInfer(infer_request(seq=31)))
    assert reason == "SEQUENCE_NOT_STARTED" and "sequence 31 to model 'lm-lstm'" in message


def test_the_apis_do_not_share_sessions(served):
    _, k, n = served
    sid = n.CreateSession(pb.CreateSessionRequest(model="lm-lstm")).session_id
    # a native session's id is no sequence id on the KServe API
    assert refusal(lambda: k.ModelInfer(infer_request(seq=sid)))[2] == "SEQUENCE_NOT_STARTED"
    n.CloseSession(pb.CloseSessionRequest(session_id=sid))
    # and nothing a KServe answer says names the session behind a sequence
    resp = k.ModelInfer(infer_request(seq="private", start=True))
    assert resp.ListFields() and "private" not in str(resp.parameters)
    k.ModelInfer(infer_request(seq="private", end=True))


def test_a_stream_pipelines_one_sequence_in_order_and_restarts_it(served):
    _, k, n = served
    steps = [[1, 2], [3], [4, 5, 6], [7]]
    requests = [infer_request(tokens=t, seq=600, start=i == 0, end=i == 3, rid=f"a{i}") for i, t in enumerate(steps)]
    requests += [
        infer_request(tokens=t, seq=600, start=i == 0, end=i == 1, rid=f"b{i}") for i, t in enumerate(steps[:2])
    ]
    answers = list(k.ModelStreamInfer(iter(requests), timeout=30))
    assert [a.error_message for a in answers] == [""] * 6
    got = {a.infer_response.id: output(a.infer_response, "logits") for a in answers}
    assert [a.infer_response.id for a in answers if a.infer_response.id.startswith("a")] == ["a0", "a1", "a2", "a3"]
    sid = n.CreateSession(pb.CreateSessionRequest(model="lm-lstm")).session_id
    for i, t in enumerate(steps):
        want = np.frombuffer(native_step(n, sid, tokens=t).logits, "<f4")
        np.testing.assert_array_equal(got[f"a{i}"].ravel(), want)
    for i in range(2):  # the restarted sequence starts from the initial state again
        np.testing.assert_array_equal(got[f"b{i}"], got[f"a{i}"])
    n.CloseSession(pb.CloseSessionRequest(session_id=sid))


def test_stream_refusals_are_answers_with_the_request_id(served):
    _, k, _ = served
    bad_dtype = infer_request(seq=700, start=True, rid="dtype")
    bad_dtype.inputs[0].datatype = "FP32"
    requests = [
        infer_request(seq=701, rid="no-start"),
        bad_dtype,
        infer_request(model="nope", seq=702, start=True, rid="model"),
        infer_request(seq=700, start=True, end=True, rid="fine"),
        infer_request(tokens=[999], seq=703, start=True, end=True, rid="range"),
    ]
    answers = {a.infer_response.id: a for a in k.ModelStreamInfer(iter(requests), timeout=30)}
    assert set(answers) == {"no-start", "dtype", "model", "fine", "range"}
    assert "must specify the START flag" in answers["no-start"].error_message
    assert "expects 'INT64'" in answers["dtype"].error_message
    assert "no model named 'nope'" in answers["model"].error_message
    assert "outside the vocabulary" in answers["range"].error_message
    assert answers["fine"].error_message == "" and len(answers["fine"].infer_response.raw_output_contents) == 1


@pytest.mark.parametrize(
    "change, reason",
    [
        (
            lambda r: (
                r.parameters["sequence_id"].ClearField("int64_param")
                or setattr(r.parameters["sequence_id"], "uint64_param", 3)
            ),
            "INVALID_SEQUENCE_ID",
        ),
        (lambda r: setattr(r.parameters["sequence_id"], "int64_param", 0), "INVALID_SEQUENCE_ID"),
        (lambda r: setattr(r.parameters["sequence_start"], "int64_param", 1), "INVALID_PARAMETER"),
        (lambda r: r.outputs.add(name="hidden"), "INVALID_TENSOR"),
        (lambda r: r.raw_input_contents.append(b"\0" * 8), "INVALID_TENSOR"),
        (lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 7), "INVALID_TENSOR"),
        (lambda r: r.inputs[0].contents.int64_contents.append(1), "INVALID_TENSOR"),
        (lambda r: setattr(r.inputs[0], "name", "features"), "INVALID_TENSOR"),
        (lambda r: r.inputs[0].shape.append(1), "INVALID_TENSOR"),
        (lambda r: setattr(r, "model_version", "latest"), "MODEL_NOT_FOUND"),
        (lambda r: setattr(r, "model_version", "7"), "MODEL_NOT_FOUND"),
    ],
)
def test_a_refused_start_leaves_no_sequence(served, change, reason):
    _, k, _ = served
    req = infer_request(seq=800, start=True)
    change(req)
    code, _, got = refusal(lambda: k.ModelInfer(req))
    assert got == reason and code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert refusal(lambda: k.ModelInfer(infer_request(seq=800)))[2] == "SEQUENCE_NOT_STARTED"


def test_metadata_config_statistics_and_index(served):
    _, k, _ = served
    meta = k.ModelMetadata(kp.ModelMetadataRequest(name="feat-gru"))
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("features", "FP32", [-1, -1, 8])]
    assert [(t.name, list(t.shape)) for t in meta.outputs] == [("logits", [-1, -1, 10]), ("probs", [-1, -1, 10])]
    config = k.ModelConfig(kp.ModelConfigRequest(name="feat-gru", version="1")).config
    assert config.HasField("sequence_batching") and config.max_batch_size == 256
    assert config.sequence_batching.max_sequence_idle_microseconds == 600 * 10**6
    assert list(config.input[0].dims) == [-1, 8] and config.parameters["kind"].string_value == "classifier"
    index = k.RepositoryIndex(kp.RepositoryIndexRequest())
    assert {(m.name, m.version, m.state) for m in index.models} >= {
        ("lm-lstm", "1", "READY"),
        ("feat-gru", "1", "READY"),
    }
    assert k.ModelReady(kp.ModelReadyRequest(name="lm-lstm")).ready
    assert not k.ModelReady(kp.ModelReadyRequest(name="lm-lstm", version="2")).ready
    stats = k.ModelStatistics(kp.ModelStatisticsRequest()).model_stats
    assert {s.name for s in stats} >= {"lm-lstm", "feat-gru", "cls-lstm"}
    assert refusal(lambda: k.ModelConfig(kp.ModelConfigRequest(name="nope")))[2] == "MODEL_NOT_FOUND"


def test_health_and_reflection_name_the_service(served):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    server, _, _ = served
    with grpc.insecure_channel(server.address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
        )
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        [answer] = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([ask]))
        assert "inference.GRPCInferenceService" in {s.name for s in answer.list_services_response.service}


def test_limits_and_ttl_are_the_engines(tiny_models):
    models_dir, _ = tiny_models
    cfg = ServerConfig(
        models=str(models_dir), port=0, metrics_port=0, device="cpu", max_sessions=2, when_full="refuse", idle_ttl_s=0.3
    )
    with ServerThread(cfg) as server, grpc.insecure_channel(server.address) as channel:
        k, n = kg.GRPCInferenceServiceStub(channel), pb_grpc.SeqServeStub(channel)
        n.CreateSession(pb.CreateSessionRequest(model="lm-lstm"))
        k.ModelInfer(infer_request(seq=1, start=True))
        code, message, reason = refusal(lambda: k.ModelInfer(infer_request(seq=2, start=True)))
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_LIMIT") and "max_sessions=2" in message
        deadline = time.monotonic() + 10  # both sessions idle: the sweeper ends them after the TTL
        while server.call(lambda: len(server.engine.table.sessions)) and time.monotonic() < deadline:
            time.sleep(0.05)
        code, message, reason = refusal(lambda: k.ModelInfer(infer_request(seq=1)))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "SEQUENCE_NOT_STARTED")
        assert "its session expired" in message
        k.ModelInfer(infer_request(seq=2, start=True, end=True))  # room again


def test_the_sequence_table_forgets_sequences_whose_sessions_ended(tiny_models):
    """Sequences abandoned without END, whose sessions were evicted, do not pile up in the table."""
    import asyncio

    from seqserve.server.api.kserve_sequences import SequenceTable
    from seqserve.server.engine import Engine

    models_dir, _ = tiny_models

    async def run() -> tuple[int, int]:
        engine = Engine(ServerConfig(models=str(models_dir), device="cpu", max_sessions=4)).load()
        await engine.start()
        table = SequenceTable(engine, prune_min=16)
        peak = 0
        for i in range(200):
            table.done(table.begin("lm-lstm", 1, i + 1, True, False))  # started, never ended
            peak = max(peak, len(table.live))
        await engine.stop()
        return peak, len(engine.table.sessions)

    peak, sessions = asyncio.run(run())
    assert sessions == 4 and peak <= 33


def test_the_naive_scheduler_serves_the_kserve_api_too(tiny_models):
    models_dir, _ = tiny_models
    cfg = ServerConfig(models=str(models_dir), port=0, metrics_port=0, device="cpu", batching="off")
    with ServerThread(cfg) as server, grpc.insecure_channel(server.address) as channel:
        k = kg.GRPCInferenceServiceStub(channel)
        assert k.ModelConfig(kp.ModelConfigRequest(name="lm-lstm")).config.max_batch_size == 1
        requests = [
            infer_request(tokens=[s, i], seq=s, start=i == 0, end=i == 2, rid=f"{s}.{i}")
            for i in range(3)
            for s in (1, 2)
        ]
        answers = list(k.ModelStreamInfer(iter(requests), timeout=30))
        assert sorted(a.infer_response.id for a in answers) == sorted(r.id for r in requests)
        assert all(not a.error_message and list(a.infer_response.outputs[0].shape) == [1, 2, 256] for a in answers)

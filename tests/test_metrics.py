"""/metrics of a real server after known traffic: every series says what the traffic implies."""

from __future__ import annotations

import grpc
import pytest

from seqserve.server.api.app import ServerThread
from seqserve.server.config import ServerConfig
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc
from tests.metrics_support import Samples, free_port, scrape_text

MODEL = {"model": "lm-gru", "version": "1"}


@pytest.fixture(params=["on", "off"], ids=["batching", "naive"])
def server(request, tiny_models):
    models_dir, _ = tiny_models
    config = ServerConfig(models=str(models_dir), port=0, metrics_port=free_port(), batching=request.param)
    with ServerThread(config) as srv:
        yield srv


def test_metrics_follow_the_traffic(server):
    port = server.server.metrics.port
    before = Samples(scrape_text(port))
    assert before.value("seqserve_serving") == 1
    assert before.value("seqserve_sessions_active", **MODEL) == 0
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.SeqServeStub(channel)
        ids = [stub.CreateSession(pb.CreateSessionRequest(model="lm-gru")).session_id for _ in range(3)]
        # 3 sessions x 4 steps of 2 tokens over one stream, then 5 unary single-token steps
        steps = [pb.StepRequest(session_id=sid, tokens=[65, 66], tag=i) for i in range(4) for sid in ids]
        answers = list(stub.StepStream(iter(steps)))
        assert len(answers) == 12 and not any(a.HasField("error") for a in answers)
        for _ in range(5):
            stub.Step(pb.StepRequest(session_id=ids[0], tokens=[67]))
        # refused: a token out of range (unary), and on the stream, an unknown session
        with pytest.raises(grpc.RpcError):
            stub.Step(pb.StepRequest(session_id=ids[0], tokens=[999]))
        refused = list(stub.StepStream(iter([pb.StepRequest(session_id="nobody", tokens=[1])])))
        assert refused[0].error.reason == "SESSION_NOT_FOUND"
        # a generation: 3-token prompt, 7 tokens
        chunks = list(stub.Generate(pb.GenerateRequest(session_id=ids[1], prompt=[70, 71, 72], max_tokens=7)))
        assert sum(len(c.tokens) for c in chunks) == 7
        stub.CloseSession(pb.CloseSessionRequest(session_id=ids[2]))
        with pytest.raises(grpc.RpcError):
            stub.GetSession(pb.GetSessionRequest(session_id=ids[2]))
    after = Samples(scrape_text(port))

    def grew(name: str, **labels: str) -> float:
        return after.value(name, **labels) - (before.value(name, **labels) if before.matching(name, **labels) else 0)

    requests = "seqserve_requests_total"
    assert grew(requests, rpc="CreateSession", code="OK", reason="") == 3
    assert grew(requests, rpc="StepStream", code="OK", reason="") == 12
    assert grew(requests, rpc="StepStream", code="NOT_FOUND", reason="SESSION_NOT_FOUND") == 1
    assert grew(requests, rpc="Step", code="OK") == 5
    assert grew(requests, rpc="Step", code="INVALID_ARGUMENT", reason="TOKEN_OUT_OF_RANGE") == 1
    assert grew(requests, rpc="Generate", code="OK") == 1
    assert grew(requests, rpc="CloseSession", code="OK") == 1
    assert grew(requests, rpc="GetSession", code="NOT_FOUND", reason="SESSION_CLOSED") == 1

    assert grew("seqserve_tokens_total", phase="stepped", **MODEL) == 12 * 2 + 5
    assert grew("seqserve_tokens_total", phase="prefilled", **MODEL) == 3
    assert grew("seqserve_tokens_total", phase="generated", **MODEL) == 7
    # every answered step is one latency observation; every model run one run-time and one batch observation
    assert grew("seqserve_step_latency_seconds_count", **MODEL) == 12 + 5
    runs = grew("seqserve_model_runs_total", **MODEL)
    assert grew("seqserve_model_run_seconds_count", **MODEL) == runs
    assert grew("seqserve_batch_rows_count", **MODEL) == runs
    # rows summed over runs: each of the 17 steps and the prompt is a row once; each generated token
    # is fed once (the last one too, so the session's state includes it)
    assert grew("seqserve_batch_rows_sum", **MODEL) == 17 + 1 + 7
    assert grew("seqserve_queue_wait_seconds_count", **MODEL) == 17 + 1
    latency_sum = grew("seqserve_step_latency_seconds_sum", **MODEL)
    assert 0 < latency_sum < 17 * 10
    assert after.bucket("seqserve_step_latency_seconds", "+Inf", **MODEL) == after.value(
        "seqserve_step_latency_seconds_count", **MODEL
    )

    assert grew("seqserve_sessions_created_total", **MODEL) == 3
    assert grew("seqserve_sessions_ended_total", reason="closed", **MODEL) == 1
    assert after.value("seqserve_sessions_active", **MODEL) == 2
    assert grew("seqserve_session_age_seconds_count", reason="closed", **MODEL) == 1
    # the recurrent state and, for a language model, its last logits (what Generate continues from)
    per_session = server.engine.registry.get("lm-gru").runtime.store.bytes_per_slot()
    assert after.value("seqserve_state_bytes", **MODEL) == 2 * per_session
    assert after.value("seqserve_state_capacity_bytes", **MODEL) >= 2 * per_session
    assert after.value("seqserve_queue_depth", **MODEL) == 0
    assert after.value("seqserve_generation_rows", **MODEL) == 0

    info = after.matching("seqserve_model_info", **MODEL)
    assert len(info) == 1 and info[0].labels["cell"] == "gru" and info[0].labels["provider"] == "CPUExecutionProvider"
    assert after.value("seqserve_model_load_seconds", **MODEL) > 0
    assert after.matching("seqserve_build_info")[0].labels["onnxruntime"]
    assert after.value("seqserve_sessions_limit") == server.config.max_sessions
    assert after.value("process_resident_memory_bytes") > 0
    assert "session_id" not in after.text and ids[0] not in after.text


def test_metrics_port_zero_serves_no_metrics(tiny_models):
    models_dir, _ = tiny_models
    with ServerThread(ServerConfig(models=str(models_dir), port=0, metrics_port=0)) as srv:
        assert srv.server.metrics is None


def test_kserve_requests_are_counted_with_the_same_names(tiny_models):
    from seqserve.kserve import grpc_service_pb2_grpc as kg
    from tests.test_kserve import infer_request

    models_dir, _ = tiny_models
    with ServerThread(ServerConfig(models=str(models_dir), port=0, metrics_port=free_port())) as srv:
        with grpc.insecure_channel(srv.address) as channel:
            stub = kg.GRPCInferenceServiceStub(channel)
            for i in range(3):
                stub.ModelInfer(infer_request("lm-gru", tokens=[1, 2], seq=7, start=i == 0, end=i == 2))
            with pytest.raises(grpc.RpcError):
                stub.ModelInfer(infer_request("lm-gru", seq=8))  # no START on a new sequence
            requests = [infer_request("lm-gru", seq=9, start=True, rid="a"), infer_request("lm-gru", seq=10, rid="b")]
            answers = list(stub.ModelStreamInfer(iter(requests)))
            assert [bool(a.error_message) for a in answers] == [False, True]
        after = Samples(scrape_text(srv.server.metrics.port))
    requests = "seqserve_requests_total"
    assert after.value(requests, rpc="ModelInfer", code="OK") == 3
    assert after.value(requests, rpc="ModelInfer", code="INVALID_ARGUMENT", reason="SEQUENCE_NOT_STARTED") == 1
    assert after.value(requests, rpc="ModelStreamInfer", code="OK") == 1
    assert after.value(requests, rpc="ModelStreamInfer", code="INVALID_ARGUMENT", reason="SEQUENCE_NOT_STARTED") == 1
    # the same engine: its steps and sessions are counted as the native API's are
    assert after.value("seqserve_tokens_total", phase="stepped", **MODEL) == 3 * 2 + 1
    assert after.value("seqserve_sessions_created_total", **MODEL) == 2
    assert after.value("seqserve_sessions_ended_total", reason="closed", **MODEL) == 1


def test_every_exported_metric_is_documented(tiny_models):
    from tests.deploy_support import documented_metrics

    models_dir, _ = tiny_models
    with ServerThread(ServerConfig(models=str(models_dir), port=0, metrics_port=free_port())) as srv:
        text = scrape_text(srv.server.metrics.port)
    from prometheus_client.parser import text_string_to_metric_families

    exported = {f.name for f in text_string_to_metric_families(text) if f.name.startswith("seqserve_")}
    documented = {name.removesuffix("_total") for name in documented_metrics() if name.startswith("seqserve_")}
    assert exported == documented

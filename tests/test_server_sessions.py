"""Session lifecycle, versions, limits, eviction, expiry, exactly-once positions and every refusal."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import torch

from seqserve.server.api.app import ServerThread
from seqserve.server.api.calls import CallCounts
from seqserve.server.api.convert import step_request
from seqserve.server.api.outbox import StreamOutbox
from seqserve.server.config import ServerConfig
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc
from tests.engine_support import FakeClock, copy_bundle

# PyTorch references on one thread: its spinning worker threads crawl next to a busy server
pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]
LOGITS = pb.OutputSpec(logits=True)
Code = grpc.StatusCode
# max_generate_tokens of the servers here, and max_tokens of a generation a test needs still running
# after other calls: it cannot end during a test (each one is cancelled or its session closed)
ENDLESS = 1_000_000


def torch_last_logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits, _ = model(torch.tensor([tokens], dtype=torch.int64), model.init_state(1))
    return logits[0, -1].numpy()


@pytest.fixture(scope="module")
def models_dir(tiny_models, tmp_path_factory):
    """multi v1 (= lm-lstm) and v2 (= lm-gru); 'liar' claims a vocabulary of 300 over a 256-row
    embedding, so tokens 256-299 pass validation and make the model run itself fail."""
    src, _ = tiny_models
    root = tmp_path_factory.mktemp("versioned")
    copy_bundle(src, "lm-lstm", root, "multi", 1)
    copy_bundle(src, "lm-gru", root, "multi", 2)
    copy_bundle(src, "lm-lstm", root, "liar", 1, input_dim=300)
    copy_bundle(src, "feat-gru", root, "feat", 1)
    return root


def serve(models_dir, **settings) -> ServerThread:
    settings.setdefault("max_generate_tokens", ENDLESS)
    return ServerThread(ServerConfig(models=str(models_dir), port=0, metrics_port=0, **settings)).start()


def wait_for(predicate, what: str, timeout: float = 10.0) -> None:
    """Wait for a server state, polling, failing after a generous ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.01)


def endless_generation(stub, sid: str):
    """A Generate call that cannot finish by itself, with its first message already received."""
    call = stub.Generate(pb.GenerateRequest(session_id=sid, prompt=[1], max_tokens=ENDLESS, tokens_per_message=1))
    next(call)
    return call


@pytest.fixture(scope="module")
def server(models_dir):
    srv = serve(models_dir, max_tokens_per_step=64)
    yield srv
    srv.stop()


@pytest.fixture
def stub(server):
    channel = grpc.insecure_channel(server.address)
    yield pb_grpc.SeqServeStub(channel)
    channel.close()


def create(stub, model: str = "multi", **fields) -> str:
    return stub.CreateSession(pb.CreateSessionRequest(model=model, **fields)).session_id


def code_of(call, *args) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    return info.value.code(), info.value.details()


def logits_of(result: pb.StepResult) -> np.ndarray:
    return np.frombuffer(result.logits, np.float32)


def test_list_models_reports_manifest_facts(stub):
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert set(models) == {"multi", "liar", "feat"}
    assert models["multi"].version == 2 and list(models["multi"].versions) == [1, 2]
    assert models["multi"].cell == "gru" and models["multi"].kind == "lm" and models["multi"].output_size == 256
    assert models["feat"].input_kind == "features" and models["feat"].input_dim == 8
    assert list(models["feat"].labels) == [f"class{i}" for i in range(10)]
    assert models["multi"].state_bytes_per_session == 4 * 2 * 32
    assert models["multi"].max_tokens_per_step == 64 and models["multi"].max_generate_tokens == ENDLESS


def test_sessions_pin_versions_and_report_themselves(stub, tiny_models):
    _, torch_models = tiny_models
    latest, first = create(stub), create(stub, version=1)
    assert len(latest) >= 16 and latest != first
    for sid, ref in ((latest, torch_models["lm-gru"]), (first, torch_models["lm-lstm"])):
        result = stub.Step(pb.StepRequest(session_id=sid, tokens=[5, 6, 7], output=LOGITS))
        assert np.abs(logits_of(result) - torch_last_logits(ref, [5, 6, 7])).max() < 1e-4
    info = stub.GetSession(pb.GetSessionRequest(session_id=first))
    assert (info.model, info.version, info.position) == ("multi", 1, 3)
    assert info.created_unix_ms <= info.last_used_unix_ms < info.expires_unix_ms
    assert abs(info.last_used_unix_ms / 1000 - time.time()) < 60
    assert code_of(stub.CreateSession, pb.CreateSessionRequest(model="multi", version=3))[0] == Code.NOT_FOUND
    code, message = code_of(stub.CreateSession, pb.CreateSessionRequest(model="nope"))
    assert code == Code.NOT_FOUND and "multi" in message


def test_client_chosen_ids(stub):
    assert create(stub, session_id="user-42.chat:1") == "user-42.chat:1"
    assert (
        code_of(stub.CreateSession, pb.CreateSessionRequest(model="multi", session_id="user-42.chat:1"))[0]
        == Code.ALREADY_EXISTS
    )
    for bad in ("has space", "-leading", "x" * 129, "slash/inside"):
        assert (
            code_of(stub.CreateSession, pb.CreateSessionRequest(model="multi", session_id=bad))[0]
            == Code.INVALID_ARGUMENT
        )


def test_close_and_reset(stub, tiny_models):
    _, torch_models = tiny_models
    sid = create(stub)
    stub.Step(pb.StepRequest(session_id=sid, tokens=[1, 2, 3, 4]))
    reset = stub.ResetSession(pb.ResetSessionRequest(session_id=sid))
    assert reset.position == 0
    result = stub.Step(pb.StepRequest(session_id=sid, tokens=[9, 8], output=LOGITS))
    assert np.abs(logits_of(result) - torch_last_logits(torch_models["lm-gru"], [9, 8])).max() < 1e-4
    assert stub.CloseSession(pb.CloseSessionRequest(session_id=sid)).position == 2
    code, message = code_of(stub.Step, pb.StepRequest(session_id=sid, tokens=[1]))
    assert code == Code.NOT_FOUND and "closed" in message
    assert code_of(stub.CloseSession, pb.CloseSessionRequest(session_id=sid))[0] == Code.NOT_FOUND
    assert code_of(stub.GetSession, pb.GetSessionRequest(session_id="never-made"))[0] == Code.NOT_FOUND


def test_every_bad_step_is_refused_precisely(stub):
    lm, feat = create(stub), create(stub, model="feat")
    frame = np.zeros(8, "<f4").tobytes()
    cases = [
        (pb.StepRequest(session_id=lm, tokens=[256]), Code.INVALID_ARGUMENT, "vocabulary"),
        (pb.StepRequest(session_id=lm, tokens=[3, -1]), Code.INVALID_ARGUMENT, "index 1"),
        (pb.StepRequest(session_id=lm), Code.INVALID_ARGUMENT, "empty"),
        (pb.StepRequest(session_id=lm, tokens=[1] * 65), Code.INVALID_ARGUMENT, "max_tokens_per_step"),
        (pb.StepRequest(session_id=lm, features=frame), Code.INVALID_ARGUMENT, "token ids"),
        (pb.StepRequest(session_id=feat, tokens=[1]), Code.INVALID_ARGUMENT, "features"),
        (pb.StepRequest(session_id=feat, features=frame[:-4]), Code.INVALID_ARGUMENT, "32 bytes"),
        (pb.StepRequest(session_id=feat, features=np.full(8, np.nan, "<f4").tobytes()), Code.INVALID_ARGUMENT, "NaN"),
        (pb.StepRequest(session_id=feat), Code.INVALID_ARGUMENT, "empty"),
        (
            pb.StepRequest(session_id=lm, tokens=[1], output=pb.OutputSpec(sample=pb.Sampling(temperature=-0.5))),
            Code.INVALID_ARGUMENT,
            "temperature",
        ),
        (
            pb.StepRequest(session_id=lm, tokens=[1], output=pb.OutputSpec(sample=pb.Sampling(top_p=2))),
            Code.INVALID_ARGUMENT,
            "top_p",
        ),
        (
            pb.StepRequest(session_id=lm, tokens=[1], output=pb.OutputSpec(none=True, argmax=True)),
            Code.INVALID_ARGUMENT,
            "none",
        ),
        (pb.StepRequest(session_id=lm, tokens=[1], expected_position=7), Code.FAILED_PRECONDITION, "at position 0"),
        (pb.StepRequest(session_id="ghost", tokens=[1]), Code.NOT_FOUND, "ghost"),
    ]
    for request, code, words in cases:
        got, message = code_of(stub.Step, request)
        assert got == code, (request, message)
        assert words in message, message
    assert stub.GetSession(pb.GetSessionRequest(session_id=lm)).position == 0
    assert stub.GetSession(pb.GetSessionRequest(session_id=feat)).position == 0


def test_retried_step_is_applied_once(stub, tiny_models):
    ref = tiny_models[1]["lm-gru"]
    sid = create(stub)
    first = stub.Step(pb.StepRequest(session_id=sid, tokens=[10, 11], expected_position=0, output=LOGITS, tag=1))
    again = stub.Step(pb.StepRequest(session_id=sid, tokens=[10, 11], expected_position=0, output=LOGITS, tag=2))
    assert again.tag == 2 and again.position == first.position == 2 and again.logits == first.logits
    assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).position == 2
    code, message = code_of(stub.Step, pb.StepRequest(session_id=sid, tokens=[99], expected_position=0))
    assert code == Code.FAILED_PRECONDITION and "at position 2" in message  # same position, other input
    # a retry over a stream, pipelined behind the original
    requests = [
        pb.StepRequest(session_id=sid, tokens=[12], expected_position=2, output=LOGITS, tag=3),
        pb.StepRequest(session_id=sid, tokens=[12], expected_position=2, output=LOGITS, tag=4),
        pb.StepRequest(session_id=sid, tokens=[13], expected_position=3, output=LOGITS, tag=5),
    ]
    results = list(stub.StepStream(iter(requests)))
    assert [r.tag for r in results] == [3, 4, 5] and not any(r.HasField("error") for r in results)
    assert results[0].logits == results[1].logits and results[2].position == 4
    assert np.abs(logits_of(results[2]) - torch_last_logits(ref, [10, 11, 12, 13])).max() < 1e-4


def test_bad_steps_on_a_stream_fail_alone(stub, tiny_models):
    ref = tiny_models[1]["lm-gru"]
    a, b = create(stub), create(stub)
    requests = [
        pb.StepRequest(session_id=a, tokens=[1], tag=1, output=LOGITS),
        pb.StepRequest(session_id=b, tokens=[2], tag=2, output=LOGITS),
        pb.StepRequest(session_id=a, tokens=[999], tag=3),
        pb.StepRequest(session_id="ghost", tokens=[1], tag=4),
        pb.StepRequest(session_id=b, tokens=[], tag=5),
        pb.StepRequest(session_id=a, tokens=[3], tag=6, output=LOGITS),
        pb.StepRequest(session_id=b, tokens=[4], tag=7, expected_position=5),
        pb.StepRequest(session_id=b, tokens=[4], tag=8, output=LOGITS),
    ]
    results = {r.tag: r for r in stub.StepStream(iter(requests))}
    assert sorted(results) == [1, 2, 3, 4, 5, 6, 7, 8]
    expected_codes = {
        3: Code.INVALID_ARGUMENT,
        4: Code.NOT_FOUND,
        5: Code.INVALID_ARGUMENT,
        7: Code.FAILED_PRECONDITION,
    }
    for tag, code in expected_codes.items():
        assert results[tag].error.code == code.value[0] and results[tag].error.message
    for tag, tokens in ((1, [1]), (6, [1, 3]), (2, [2]), (8, [2, 4])):
        assert not results[tag].HasField("error")
        assert np.abs(logits_of(results[tag]) - torch_last_logits(ref, tokens)).max() < 1e-4


def test_a_failing_model_run_fails_only_its_own_steps(models_dir, tiny_models):
    """On the CPU provider, where an embedding index past the table fails the run. (ORT's CUDA
    Gather does not check indices, so there the lying model's run does not fail at all.)"""
    server = serve(models_dir, device="cpu", max_tokens_per_step=64)
    try:
        with grpc.insecure_channel(server.address) as channel:
            _failing_run_fails_alone(server, pb_grpc.SeqServeStub(channel), tiny_models[1]["lm-lstm"])
    finally:
        server.stop()


def _failing_run_fails_alone(server, stub, ref):
    sessions = [create(stub, model="liar") for _ in range(6)]
    first = [
        pb.StepRequest(session_id=sid, tokens=[280 if i == 2 else 40 + i], tag=i, output=LOGITS)
        for i, sid in enumerate(sessions)
    ]
    sink = StreamOutbox(CallCounts(), "StepStream")
    scheduler = server.engine.scheduler(server.engine.registry.get("liar"))

    def submit_all():  # on the server's loop, all at once: they share one tick and one batch
        before = scheduler.stats.split_runs
        for request in first:
            server.engine.submit_stream_step(step_request(request), sink)
        return before

    split_before = server.call(submit_all)
    wait_for(lambda: server.call(lambda: len(sink.out)) == 6, "the six answers")
    results = {r.tag: r for r in server.call(lambda: list(sink.out))}
    assert server.call(lambda: scheduler.stats.split_runs) == split_before + 1  # one shared run failed
    second = [pb.StepRequest(session_id=sid, tokens=[7], tag=10 + i, output=LOGITS) for i, sid in enumerate(sessions)]
    results.update({r.tag: r for r in stub.StepStream(iter(second))})
    assert results[2].error.code == Code.INTERNAL.value[0] and "unchanged at position 0" in results[2].error.message
    for i in range(6):
        history = [7] if i == 2 else [40 + i, 7]
        result = results[10 + i]
        assert not result.HasField("error") and result.position == len(history)
        assert np.abs(logits_of(result) - torch_last_logits(ref, history)).max() < 1e-4
        if i != 2:
            assert np.abs(logits_of(results[i]) - torch_last_logits(ref, [40 + i])).max() < 1e-4


def test_lru_eviction_when_full(models_dir):
    srv = serve(models_dir, max_sessions=3, when_full="evict")
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.SeqServeStub(channel)
            a, b, c = create(stub), create(stub), create(stub)
            stub.Step(pb.StepRequest(session_id=a, tokens=[1]))  # b is now the least recently used
            d = create(stub)
            code, message = code_of(stub.Step, pb.StepRequest(session_id=b, tokens=[1]))
            assert code == Code.NOT_FOUND and "evicted" in message
            for sid in (a, c, d):
                stub.Step(pb.StepRequest(session_id=sid, tokens=[1]))
            # a generating session is busy: it is never the one evicted
            call = endless_generation(stub, c)
            stub.Step(pb.StepRequest(session_id=a, tokens=[1]))
            stub.Step(pb.StepRequest(session_id=d, tokens=[1]))
            assert stub.GetSession(pb.GetSessionRequest(session_id=c)).generating
            e = create(stub)  # c is least recently used but busy: a goes
            assert code_of(stub.GetSession, pb.GetSessionRequest(session_id=a))[0] == Code.NOT_FOUND
            assert stub.GetSession(pb.GetSessionRequest(session_id=c)).session_id == c
            call.cancel()
            assert sorted(srv.call(lambda: list(srv.engine.table.sessions))) == sorted([c, d, e])
    finally:
        srv.stop()


def test_refuse_mode_and_per_model_limit(models_dir):
    srv = serve(models_dir, max_sessions=3, max_sessions_per_model=2, when_full="refuse")
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.SeqServeStub(channel)
            create(stub), create(stub)
            code, message = code_of(stub.CreateSession, pb.CreateSessionRequest(model="multi"))
            assert code == Code.RESOURCE_EXHAUSTED and "max_sessions_per_model=2" in message
            create(stub, model="feat")
            code, message = code_of(stub.CreateSession, pb.CreateSessionRequest(model="liar"))
            assert code == Code.RESOURCE_EXHAUSTED and "max_sessions=3" in message
    finally:
        srv.stop()


def test_idle_sessions_expire(models_dir):
    """Expiry is decided by the session table's clock, which the test drives: steps every 0.3 s
    (of that clock) keep a session alive far past its 0.4 s TTL, while the idle one is expired by
    the server's own sweeper (it runs every 0.1 s of real time)."""
    srv = serve(models_dir, idle_ttl_s=0.4)
    try:
        clock = FakeClock()
        srv.call(lambda: setattr(srv.engine.table, "clock", clock))
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.SeqServeStub(channel)
            idle, active = create(stub), create(stub)
            for _ in range(10):  # 3 s of the table's clock in all, never 0.4 s without a step
                clock.now += 0.3
                stub.Step(pb.StepRequest(session_id=active, tokens=[1]))
            wait_for(lambda: srv.call(lambda: idle not in srv.engine.table.sessions), "the idle session to expire")
            code, message = code_of(stub.Step, pb.StepRequest(session_id=idle, tokens=[1]))
            assert code == Code.NOT_FOUND and "expired" in message and "0.4 s idle" in message
            info = stub.GetSession(pb.GetSessionRequest(session_id=active))
            assert info.position == 10 and info.expires_unix_ms == int((clock.now + 0.4) * 1000)
            clock.now += 0.5
            wait_for(lambda: srv.call(lambda: active not in srv.engine.table.sessions), "the active session to expire")
            assert code_of(stub.GetSession, pb.GetSessionRequest(session_id=active))[0] == Code.NOT_FOUND
    finally:
        srv.stop()


def test_closing_busy_sessions_fails_their_work_and_frees_their_slots(server, stub, tiny_models):
    ref = tiny_models[1]["lm-gru"]
    store = server.engine.registry.get("multi").runtime.store
    in_use = server.call(lambda: store.in_use)
    generating = create(stub)
    call = endless_generation(stub, generating)
    stub.CloseSession(pb.CloseSessionRequest(session_id=generating))
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == Code.NOT_FOUND and "closed" in info.value.details()
    # steps queued on a session when it is closed fail with NOT_FOUND, in order
    queued = create(stub)
    sink = StreamOutbox(CallCounts(), "StepStream")

    def submit_then_close():
        for i in range(5):
            server.engine.submit_stream_step(step_request(pb.StepRequest(session_id=queued, tokens=[i], tag=i)), sink)
        server.engine.close_session(queued)
        return [(r.tag, r.error.code) for r in sink.out]

    assert server.call(submit_then_close) == [(i, Code.NOT_FOUND.value[0]) for i in range(5)]
    wait_for(lambda: server.call(lambda: store.in_use) == in_use, "the generating session's slot to come back")
    fresh = create(stub)  # reuses a freed slot: it must start from the initial state
    result = stub.Step(pb.StepRequest(session_id=fresh, tokens=[4, 2], output=LOGITS))
    assert np.abs(logits_of(result) - torch_last_logits(ref, [4, 2])).max() < 1e-4


def test_closing_a_generating_session_in_naive_mode(models_dir):
    srv = serve(models_dir, batching="off")
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.SeqServeStub(channel)
            sid = create(stub)
            call = endless_generation(stub, sid)
            stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            assert info.value.code() == Code.NOT_FOUND and "closed" in info.value.details()
            store = srv.engine.registry.get("multi").runtime.store
            wait_for(lambda: srv.call(lambda: store.in_use) == 0, "the slot to come back")
    finally:
        srv.stop()

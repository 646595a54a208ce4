"""PackedStepStream: many sessions' steps per message give, step for step, what StepStream gives.

The same script of steps (every served model, random chunking, two steps of one session in one
message, and refused steps: unknown sessions, wrong expected positions, bad input) runs on two
mirror sets of sessions: packed into messages of random sizes on PackedStepStream, and one step per
message on StepStream. Per step, positions and errors (code, reason, metadata) must be equal, the
results of each session must come in its order, and every position's logits must match one
whole-sequence PyTorch run (test_server_parity.reference) within 1e-4, on both paths.
"""

from __future__ import annotations

import asyncio
import sys

import grpc
import numpy as np
import pytest

from seqserve.bench.procs import ServingProcess
from seqserve.server.api.app import ServerThread
from seqserve.server.config import ServerConfig
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc
from tests.client_support import FLAVOURS, flavour_fixture
from tests.test_server_parity import TOL, make_input, reference, rows_of, session_plans, step_request

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tiny_models, one_torch_thread):
    models_dir, _ = tiny_models
    config = ServerConfig(models=str(models_dir), port=0, metrics_port=0, max_batch=64, max_wait_ms=1.0, device="cpu")
    with ServerThread(config) as srv:
        yield srv


def _script(plans: list[dict], rng) -> list[tuple]:
    """The steps in sending order: (plan index or None, piece, expected position, kind); kind is
    "ok" or the refusal it provokes. Sessions interleave; refusals are sprinkled in."""
    order = sorted(((k, j) for j, p in enumerate(plans) for k in range(len(p["pieces"]))), key=lambda kj: kj)
    positions = [0] * len(plans)
    script: list[tuple] = []
    for n, (k, j) in enumerate(order):
        p = plans[j]
        piece = p["pieces"][k]
        if n % 7 == 3:  # a step claiming a position the session is not at
            script.append((j, piece, positions[j] + 5, "mismatch"))
        if n % 11 == 5:  # input the model refuses
            bad = np.full(1, 10_000, np.int64) if piece.dtype == np.int64 else np.zeros((1, 3), np.float32)
            script.append((j, bad, positions[j], "bad-input"))
        if n % 13 == 6:
            script.append((None, piece, None, "missing"))
        script.append((j, piece, positions[j], "ok"))
        positions[j] += len(piece)
    return script


def _requests(script, ids: list[str]) -> list[pb.StepRequest]:
    out = []
    for tag, (j, piece, position, _) in enumerate(script):
        sid = f"nobody-{tag}" if j is None else ids[j]
        out.append(step_request(sid, piece, tag, position))
    return out


def _packs(requests: list[pb.StepRequest], rng) -> list[pb.PackedSteps]:
    packs, i = [], 0
    while i < len(requests):
        n = int(rng.choice([1, 2, 5, 17, 40]))
        packs.append(pb.PackedSteps(steps=requests[i : i + n]))
        i += n
    return packs


def _answer(result: pb.StepResult, sid: str) -> tuple:
    """What must be equal on both paths: the session id differs between the mirror sets, and a
    position mismatch's ``applied`` (how far the session's queued steps had run when the step was
    checked) depends on timing, not on the steps."""
    err = result.error
    metadata = {k: ("<session>" if v == sid else v) for k, v in err.metadata.items() if k != "applied"}
    return (result.position, result.steps, result.width, err.code, err.reason, sorted(metadata.items()))


def test_packed_steps_answer_exactly_as_one_step_per_message(server, tiny_models):
    _, torch_models = tiny_models
    rng = np.random.default_rng(21)
    plans = session_plans(torch_models, 30, rng, (6, 24), ("tokens", "random", "whole"))
    script = _script(plans, rng)
    calls = server.server.calls
    before = dict(calls.counts)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.SeqServeStub(channel)

        def create() -> list[str]:
            return [stub.CreateSession(pb.CreateSessionRequest(model=p["name"])).session_id for p in plans]

        packed_ids, single_ids = create(), create()
        packs = _packs(_requests(script, packed_ids), rng)
        assert any(len({s.session_id for s in m.steps}) < len(m.steps) for m in packs)  # a session twice in one
        messages = list(stub.PackedStepStream(iter(packs), timeout=60))
        assert not any(len(m.columns) for m in messages), "columns only for a client that asks for them"
        packed = [r for message in messages for r in message.results]
        single = list(stub.StepStream(iter(_requests(script, single_ids)), timeout=60))
        finals = [
            [stub.GetSession(pb.GetSessionRequest(session_id=sid)).position for sid in ids]
            for ids in (packed_ids, single_ids)
        ]

    for results, ids in ((packed, packed_ids), (single, single_ids)):
        assert sorted(r.tag for r in results) == list(range(len(script)))
        for j, sid in enumerate(ids):  # each session's results in its order
            tags = [r.tag for r in results if r.session_id == sid]
            assert tags == sorted(tags) and tags, f"session {j}: results out of order"
    by_tag = [{r.tag: r for r in results} for results in (packed, single)]
    kinds = {"ok": ("", 0), "mismatch": ("POSITION_MISMATCH", 9), "missing": ("SESSION_NOT_FOUND", 5)}
    for tag, (j, _, _, kind) in enumerate(script):
        a, b = by_tag[0][tag], by_tag[1][tag]
        sid_a, sid_b = (a.session_id, b.session_id) if j is not None else ("", "")
        assert _answer(a, sid_a) == _answer(b, sid_b), f"step {tag} ({kind})"
        if kind in kinds:
            assert (a.error.reason, a.error.code) == kinds[kind], (tag, kind, a.error)
        else:
            assert a.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], (tag, a.error)
    for j, p in enumerate(plans):
        expected = reference(torch_models[p["name"]], p["x"])
        for side in (0, 1):
            ok = [by_tag[side][t] for t, s in enumerate(script) if s[0] == j and s[3] == "ok"]
            logits = np.concatenate([rows_of(r) for r in ok])
            assert logits.shape == expected.shape
            diff = float(np.abs(logits - expected).max())
            assert diff < TOL, f"session {j} ({p['name']}, {'packed' if side == 0 else 'single'}): max diff {diff}"
            assert [r.position for r in ok] == np.cumsum([len(piece) for piece in p["pieces"]]).tolist()
    assert finals[0] == finals[1] == [len(p["x"]) for p in plans]

    # every step of a packed message counts as one request of PackedStepStream
    grew = {k: v - before.get(k, 0) for k, v in calls.counts.items() if k[0] == "PackedStepStream"}
    failed = sum(1 for s in script if s[3] != "ok")
    assert grew[("PackedStepStream", "OK", "")] == len(script) - failed
    assert sum(v for k, v in grew.items() if k[1] != "OK") == failed
    assert grew[("PackedStepStream", "FAILED_PRECONDITION", "POSITION_MISMATCH")] == sum(
        1 for s in script if s[3] == "mismatch"
    )


# What steps ask for, in turn: answered in columns but for all_positions (several positions) and
# none (no values), which come as StepResults beside them.
SPECS = [
    None,
    pb.OutputSpec(top_k=3, argmax=True),
    pb.OutputSpec(logits=True),
    pb.OutputSpec(probs=True, top_k=2),
    pb.OutputSpec(sample=pb.Sampling(temperature=0.8, seed=5), logits=True),
    pb.OutputSpec(none=True),
    pb.OutputSpec(logits=True, all_positions=True),
]


def _in_stream_order(messages) -> list[pb.StepResult]:
    """Every answer of a packed stream as a StepResult, in the stream's order: a message's results,
    then its column blocks row by row (a row rebuilt as the StepResult StepStream would send)."""
    out = []
    for message in messages:
        out += message.results
        for block in message.columns:
            n, k, w = len(block.tags), block.top_k, block.width
            for i in range(n):
                r = pb.StepResult(session_id=block.session_ids[i], tag=block.tags[i], position=block.positions[i])
                r.steps, r.width = 1, w
                r.top_k_ids.extend(block.top_k_ids[i * k : (i + 1) * k])
                r.top_k_logprobs.extend(block.top_k_logprobs[i * k : (i + 1) * k])
                r.argmax.extend(block.argmax[i : i + 1])
                r.sampled.extend(block.sampled[i : i + 1])
                r.logits = block.logits[i * 4 * w : (i + 1) * 4 * w]
                r.probs = block.probs[i * 4 * w : (i + 1) * 4 * w]
                out.append(r)
    return out


def test_columns_answer_exactly_as_one_step_per_message(server, tiny_models):
    """A client that reads columns gets, step for step, StepStream's answers: every output kind,
    refusals in their session's order among the column answers, values within 1e-4 and the same
    ids; and the logits asked for are PyTorch's at that position."""
    _, torch_models = tiny_models
    rng = np.random.default_rng(33)
    plans = session_plans(torch_models, 30, rng, (4, 12), ("tokens", "tokens", "random"))
    script = _script(plans, rng)
    spec_of = [SPECS[tag % len(SPECS)] for tag in range(len(script))]

    def requests(ids: list[str]) -> list[pb.StepRequest]:
        out = _requests(script, ids)
        for req, spec in zip(out, spec_of):
            req.ClearField("output")
            if spec is not None:
                req.output.CopyFrom(spec)
        return out

    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.SeqServeStub(channel)

        def create() -> list[str]:
            return [stub.CreateSession(pb.CreateSessionRequest(model=p["name"])).session_id for p in plans]

        packed_ids, single_ids = create(), create()
        packs = _packs(requests(packed_ids), rng)
        for m in packs:
            m.columns = True
        messages = list(stub.PackedStepStream(iter(packs), timeout=60))
        single = list(stub.StepStream(iter(requests(single_ids)), timeout=60))
    packed = _in_stream_order(messages)
    in_columns = sum(len(b.tags) for m in messages for b in m.columns)
    assert in_columns > len(script) // 3, f"only {in_columns} of {len(script)} answers came in columns"

    assert sorted(r.tag for r in packed) == list(range(len(script)))
    for j, sid in enumerate(packed_ids):  # each session's answers in its order, columns or not
        tags = [r.tag for r in packed if r.session_id == sid]
        assert tags == sorted(tags) and tags, f"session {j}: answers out of order: {tags}"
    by_tag = [{r.tag: r for r in results} for results in (packed, single)]
    positions = [0] * len(plans)
    for tag, (j, piece, _, kind) in enumerate(script):
        a, b = by_tag[0][tag], by_tag[1][tag]
        sid_a, sid_b = (a.session_id, b.session_id) if j is not None else ("", "")
        assert _answer(a, sid_a) == _answer(b, sid_b), f"step {tag} ({kind})"
        assert list(a.top_k_ids) == list(b.top_k_ids), f"step {tag}: top-k ids"
        assert list(a.argmax) == list(b.argmax) and list(a.sampled) == list(b.sampled), f"step {tag}"
        np.testing.assert_allclose(a.top_k_logprobs, b.top_k_logprobs, atol=TOL)
        for name in ("logits", "probs"):
            np.testing.assert_allclose(
                np.frombuffer(getattr(a, name), np.float32), np.frombuffer(getattr(b, name), np.float32), atol=TOL
            )
        if kind != "ok":
            continue
        positions[j] += len(piece)
        spec = spec_of[tag]
        if spec is not None and spec.logits and not spec.all_positions:  # the last position's logits
            expected = reference(torch_models[plans[j]["name"]], plans[j]["x"][: positions[j]])[-1]
            np.testing.assert_allclose(rows_of(a)[-1], expected, atol=TOL)


def run_counts(server, model: str):
    """A function that reads ``model``'s scheduler counts so far: runs, rows, direct runs."""
    scheduler = server.engine.scheduler(server.engine.registry.get(model))
    counts = scheduler.stats
    return lambda: np.array(server.call(lambda: (counts.runs, counts.rows, counts.direct_runs)))


def test_one_packed_message_is_one_model_run(server, tiny_models):
    """Single-token steps of many sessions in one message share one run, even when the first of them
    is the session that just stepped alone (whose lone steps run at once, by themselves)."""
    _, torch_models = tiny_models
    model = torch_models["lm-gru"]
    stats = run_counts(server, "lm-gru")
    rng = np.random.default_rng(4)
    n = 24
    xs = [make_input(model, 4, rng) for _ in range(n)]

    async def run():
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.SeqServeStub(channel)
            ids = [(await stub.CreateSession(pb.CreateSessionRequest(model="lm-gru"))).session_id for _ in range(n)]
            got: dict[str, list] = {sid: [] for sid in ids}
            call = stub.PackedStepStream()

            async def answers(count: int) -> None:
                while count:
                    message = await call.read()
                    for r in message.results:
                        got[r.session_id].append(rows_of(r))
                    count -= len(message.results)

            for k in range(3):  # the first session alone: its steps run at once
                await call.write(pb.PackedSteps(steps=[step_request(ids[0], xs[0][k : k + 1], tag=k)]))
                await answers(1)
            before = stats()
            await call.write(
                pb.PackedSteps(
                    steps=[step_request(sid, xs[i][3 if i == 0 else 0 :][:1], tag=10 + i) for i, sid in enumerate(ids)]
                )
            )
            await answers(n)
            delta = stats() - before
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
            return ids, got, delta

    ids, got, delta = asyncio.run(run())
    assert delta.tolist() == [1, n, 0], "runs, rows and direct runs of the packed message"
    want = reference(model, xs[0])
    np.testing.assert_allclose(np.concatenate(got[ids[0]]), want, atol=TOL)
    for i in range(1, n):
        np.testing.assert_allclose(np.concatenate(got[ids[i]]), reference(model, xs[i][:1]), atol=TOL)


def test_a_message_of_no_steps_is_answered_with_nothing(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.SeqServeStub(channel)
        sid = stub.CreateSession(pb.CreateSessionRequest(model="lm-gru")).session_id
        messages = [pb.PackedSteps(), pb.PackedSteps(steps=[pb.StepRequest(session_id=sid, tokens=[1], tag=3)])]
        [answer] = list(stub.PackedStepStream(iter(messages), timeout=30))
        assert [(r.tag, r.position) for r in answer.results] == [(3, 1)]


# -- the SDK's multiplexed stream packs by default ------------------------------------------------


@pytest.fixture(params=FLAVOURS)
def flavour(request):
    yield from flavour_fixture(request)


@pytest.mark.parametrize("packed", [True, False])
def test_sdk_stream_sends_many_sessions_packed(server, flavour, tiny_models, packed):
    """Many sessions through one SDK stream: PyTorch's logits and positions per session, and the
    server counts every step on PackedStepStream (or on StepStream with ``packed=False``)."""
    _, torch_models = tiny_models
    model = torch_models["lm-lstm"]
    n, steps = 40, 3
    rng = np.random.default_rng(8)
    xs = [make_input(model, steps * 2, rng) for _ in range(n)]
    calls = server.server.calls
    rpc, other = ("PackedStepStream", "StepStream") if packed else ("StepStream", "PackedStepStream")
    before = (calls.counts[(rpc, "OK", "")], calls.counts[(other, "OK", "")])
    with flavour.client(server.address, timeout=30) as client:
        sessions = [client.session("lm-lstm") for _ in range(n)]
        with client.stream(window=n * steps, packed=packed) as stream:
            futures = [
                (i, k, stream.submit(s, xs[i][2 * k : 2 * k + 2], logits=True, all_positions=True))
                for k in range(steps)
                for i, s in enumerate(sessions)
            ]
            got: dict[int, list] = {i: [] for i in range(n)}
            for i, k, future in futures:
                r = future.result(timeout=60)
                assert r.position == 2 * (k + 1)
                got[i].append(np.asarray(r.logits))
            assert stream.packed is packed
        for s in sessions:
            s.close()
    for i in range(n):
        np.testing.assert_allclose(np.concatenate(got[i]), reference(model, xs[i]), atol=TOL)
    after = (calls.counts[(rpc, "OK", "")], calls.counts[(other, "OK", "")])
    assert (after[0] - before[0], after[1] - before[1]) == (n * steps, 0)


def test_sdk_stream_falls_back_to_one_step_per_message(flavour):
    """A server without PackedStepStream (the bench's echo server, a bare SeqServe servicer) answers
    UNIMPLEMENTED: the stream resends its steps on StepStream, and every step is answered."""
    echo = ServingProcess([sys.executable, "-m", "seqserve.bench.echo", "--port", "0"], "echo server")
    try:
        with flavour.client(echo.address, timeout=30) as client:
            sessions = [client.session("any") for _ in range(5)]
            with client.stream() as stream:
                futures = [stream.submit(s, [1, 2, 3]) for s in sessions for _ in range(2)]
                assert [f.result(timeout=30).position for f in futures] == [3, 6] * 5
                assert stream.packed is False
    finally:
        echo.stop()


def test_sdk_stream_reads_column_answers_as_unary_steps_give_them(server, flavour):
    """Through the SDK's packed stream (which asks for columns), each output kind's result has the
    fields, shapes and values a unary Step of the same input on a twin session gives."""
    from seqserve.client import Output, Sampling

    outputs = [
        Output(),
        Output(top_k=3, argmax=True),
        Output(logits=True),
        Output(probs=True, top_k=2),
        Output(sample=Sampling(temperature=0.7, seed=11), logits=True),
        Output(none=True),
    ]
    n = 24
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, 64, (n, 3)).tolist()
    with flavour.client(server.address, timeout=30) as client:
        streamed = [client.session("lm-gru") for _ in range(n)]
        unary = [client.session("lm-gru") for _ in range(n)]
        with client.stream(window=n) as stream:
            for k in range(3):
                futures = [
                    stream.submit(s, tokens[i][k : k + 1], outputs[i % len(outputs)]) for i, s in enumerate(streamed)
                ]
                got = [f.result(timeout=30) for f in futures]
                want = [s.step(tokens[i][k : k + 1], outputs[i % len(outputs)]) for i, s in enumerate(unary)]
                for i, (a, b) in enumerate(zip(got, want)):
                    assert (a.session_id, a.position, a.steps, a.width) == (streamed[i].id, k + 1, b.steps, b.width)
                    for name in ("top_k_ids", "argmax", "sampled", "top_k_logprobs", "logits", "probs"):
                        x, y = getattr(a, name), getattr(b, name)
                        assert (x is None) == (y is None), (i, name)
                        if x is not None:
                            assert x.shape == y.shape and x.dtype == y.dtype, (i, name, x.shape, y.shape)
                            np.testing.assert_allclose(x, y, atol=TOL, err_msg=f"session {i}, {name}")
                    assert a.token == b.token
        calls = server.server.calls
        assert calls.counts[("PackedStepStream", "OK", "")] >= 3 * n

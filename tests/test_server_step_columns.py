"""PackedStepStream's column blocks (StepColumns): each row is answered exactly as the StepRequest
made of it would be on StepStream.

One script of steps (token models, single tokens and longer pieces, output specs in turn) runs on
two mirror sets of sessions: as column blocks packed into messages of random sizes, and one
StepRequest per message on StepStream. Refusals are mixed in (unknown sessions, wrong expected
positions, tokens out of range, a features model fed tokens, an output spec that contradicts
itself, an empty row) and so are retries of the step just taken. Per step, positions, errors and
values must be equal, each session's answers in its order, and the logits asked for PyTorch's.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from seqserve.server.api.app import ServerThread
from seqserve.server.config import ServerConfig
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc
from tests.test_server_packed import _answer, _in_stream_order, run_counts
from tests.test_server_parity import TOL, make_input, reference, rows_of

pytestmark = pytest.mark.timeout(120)

TOKEN_MODELS = ("lm-gru", "lm-lstm", "lm-rnn", "cls-lstm")
SPECS = [
    None,
    pb.OutputSpec(logits=True),
    pb.OutputSpec(top_k=3, argmax=True),
    pb.OutputSpec(none=True),
    pb.OutputSpec(logits=True, all_positions=True),
]
CONTRADICTION = pb.OutputSpec(none=True, top_k=2)  # INVALID_OUTPUT_SPEC


@pytest.fixture(scope="module")
def server(tiny_models, one_torch_thread):
    models_dir, _ = tiny_models
    config = ServerConfig(models=str(models_dir), port=0, metrics_port=0, max_batch=64, max_wait_ms=1.0, device="cpu")
    with ServerThread(config) as srv:
        yield srv


def _script(torch_models, count: int, rng) -> tuple[list[dict], list[dict]]:
    """Sessions (model, input) and the steps in sending order: dict(session, tokens, expected,
    spec, kind); ``session`` indexes the sessions, -1 is a session that does not exist and -2 a
    features model's session."""
    plans = []
    for i in range(count):
        name = TOKEN_MODELS[i % len(TOKEN_MODELS)]
        plans.append(dict(name=name, x=make_input(torch_models[name], int(rng.integers(5, 14)), rng)))
    fed = [0] * count
    steps: list[dict] = []
    n = 0
    while any(f < len(p["x"]) for f, p in zip(fed, plans)):
        j = int(rng.integers(count))
        if fed[j] == len(plans[j]["x"]):
            continue
        n += 1
        size = 1 if n % 4 else int(rng.integers(2, 5))
        piece = plans[j]["x"][fed[j] : fed[j] + size].tolist()
        spec = SPECS[n % len(SPECS)]
        checked = n % 3 != 0  # carries expected_position
        at = fed[j] if checked else None
        if n % 9 == 4:
            steps.append(dict(session=j, tokens=piece, expected=fed[j] + 3, spec=spec, kind="mismatch"))
        if n % 10 == 6:
            steps.append(dict(session=j, tokens=[10_000], expected=at, spec=spec, kind="out-of-range"))
        if n % 13 == 7:
            steps.append(dict(session=-1, tokens=[1], expected=None, spec=spec, kind="missing"))
        if n % 11 == 2:
            steps.append(dict(session=-2, tokens=[1], expected=None, spec=spec, kind="wrong-kind"))
        if n % 12 == 5:
            steps.append(dict(session=j, tokens=[1], expected=at, spec=CONTRADICTION, kind="bad-spec"))
        if n % 14 == 3:
            steps.append(dict(session=j, tokens=[], expected=at, spec=spec, kind="empty"))
        steps.append(dict(session=j, tokens=piece, expected=at, spec=spec, kind="ok"))
        if checked and n % 8 == 1:  # the same step again: answered again, not applied twice
            steps.append(dict(session=j, tokens=piece, expected=at, spec=spec, kind="retry"))
        fed[j] += len(piece)
    return plans, steps


def _sid(step: dict, ids: list[str], features_id: str, tag: int) -> str:
    return {-1: f"nobody-{tag}", -2: features_id}.get(step["session"]) or ids[step["session"]]


def _requests(steps: list[dict], ids: list[str], features_id: str) -> list[pb.StepRequest]:
    out = []
    for tag, step in enumerate(steps):
        req = pb.StepRequest(session_id=_sid(step, ids, features_id, tag), tokens=step["tokens"], tag=tag)
        if step["spec"] is not None:
            req.output.CopyFrom(step["spec"])
        if step["expected"] is not None:
            req.expected_position = step["expected"]
        out.append(req)
    return out


def _blocks(steps: list[dict], ids: list[str], features_id: str, rng) -> list[pb.PackedSteps]:
    """Messages of random sizes, each a run of blocks: a block takes consecutive steps while they
    ask for the same output and agree on carrying an expected position, so the rows keep the
    script's order."""
    messages, i = [], 0
    while i < len(steps):
        n = int(rng.choice([1, 3, 8, 20, 45]))
        message = pb.PackedSteps(columns=True)
        key = block = None
        for tag in range(i, min(i + n, len(steps))):
            step = steps[tag]
            k = (None if step["spec"] is None else step["spec"].SerializeToString(), step["expected"] is None)
            if block is None or k != key:
                key, block = k, message.step_columns.add()
                if step["spec"] is not None:
                    block.output.CopyFrom(step["spec"])
            block.session_ids.append(_sid(step, ids, features_id, tag))
            block.tags.append(tag)
            block.tokens.extend(step["tokens"])
            block.lengths.append(len(step["tokens"]))
            if step["expected"] is not None:
                block.expected_positions.append(step["expected"])
        for b in message.step_columns:  # one token per row needs no lengths: leave them out where it holds
            if all(n == 1 for n in b.lengths):
                b.ClearField("lengths")
        messages.append(message)
        i += n
    return messages


def test_column_blocks_answer_exactly_as_step_requests(server, tiny_models):
    _, torch_models = tiny_models
    rng = np.random.default_rng(8)
    plans, steps = _script(torch_models, 24, rng)
    kinds = {s["kind"] for s in steps}
    assert kinds == {"ok", "retry", "mismatch", "out-of-range", "missing", "wrong-kind", "bad-spec", "empty"}
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.SeqServeStub(channel)

        def create() -> tuple[list[str], str]:
            ids = [stub.CreateSession(pb.CreateSessionRequest(model=p["name"])).session_id for p in plans]
            return ids, stub.CreateSession(pb.CreateSessionRequest(model="feat-gru")).session_id

        (block_ids, block_feat), (single_ids, single_feat) = create(), create()
        messages = _blocks(steps, block_ids, block_feat, rng)
        assert sum(1 for m in messages for b in m.step_columns if len(b.session_ids) > 1 and not b.lengths) > 10
        assert any(b.lengths for m in messages for b in m.step_columns)
        answers = list(stub.PackedStepStream(iter(messages), timeout=60))
        single = list(stub.StepStream(iter(_requests(steps, single_ids, single_feat)), timeout=60))
        finals = [
            [stub.GetSession(pb.GetSessionRequest(session_id=sid)).position for sid in ids]
            for ids in (block_ids, single_ids)
        ]
    blocked = _in_stream_order(answers)
    assert sorted(r.tag for r in blocked) == list(range(len(steps)))
    for j, sid in enumerate(block_ids):  # each session's answers in its order
        tags = [r.tag for r in blocked if r.session_id == sid]
        assert tags == sorted(tags) and tags, f"session {j}: answers out of order: {tags}"
    by_tag = [{r.tag: r for r in results} for results in (blocked, single)]
    reasons = {
        "ok": "",
        "retry": "",
        "mismatch": "POSITION_MISMATCH",
        "out-of-range": "TOKEN_OUT_OF_RANGE",
        "missing": "SESSION_NOT_FOUND",
        "wrong-kind": "WRONG_INPUT_KIND",
        "bad-spec": "INVALID_OUTPUT_SPEC",
        "empty": "EMPTY_INPUT",
    }
    fed = [0] * len(plans)
    for tag, step in enumerate(steps):
        a, b = by_tag[0][tag], by_tag[1][tag]
        sids = (a.session_id, b.session_id) if step["session"] >= 0 else ("", "")
        assert _answer(a, sids[0]) == _answer(b, sids[1]), f"step {tag} ({step['kind']})"
        assert a.error.reason == reasons[step["kind"]], (tag, step["kind"], a.error)
        assert list(a.top_k_ids) == list(b.top_k_ids) and list(a.argmax) == list(b.argmax), f"step {tag}"
        np.testing.assert_allclose(a.top_k_logprobs, b.top_k_logprobs, atol=TOL)
        np.testing.assert_allclose(np.frombuffer(a.logits, np.float32), np.frombuffer(b.logits, np.float32), atol=TOL)
        if step["kind"] not in ("ok", "retry"):
            continue
        j = step["session"]
        if step["kind"] == "ok":
            fed[j] += len(step["tokens"])
        assert a.position == fed[j], f"step {tag}: position"
        spec = step["spec"]
        if spec is not None and spec.logits:  # PyTorch's logits at the positions answered
            want = reference(torch_models[plans[j]["name"]], plans[j]["x"][: fed[j]])
            got = rows_of(a)
            np.testing.assert_allclose(got, want[-len(got) :], atol=TOL)
    assert finals[0] == finals[1] == [len(p["x"]) for p in plans]


def test_a_block_whose_columns_disagree_is_refused_row_by_row(server):
    """Every row of a malformed block gets INVALID_STEP_COLUMNS (with its tag where the block has
    one), nothing of it is applied, and the blocks beside it and the stream go on."""
    malformed = [
        dict(tags=[1, 2], tokens=[5, 6, 7]),  # a tag missing: the third row answers with tag 0
        dict(tags=[11, 12, 13], tokens=[5, 6]),  # a token short, no lengths
        dict(tags=[21, 22, 23], tokens=[5, 6, 7], expected_positions=[0, 0]),
        dict(tags=[31, 32, 33], tokens=[5, 6, 7, 8], lengths=[1, 1, 1]),  # lengths add up to 3
        dict(tags=[41, 42, 43], tokens=[5, 6, 7], lengths=[1, 2]),
    ]
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.SeqServeStub(channel)
        ids = [stub.CreateSession(pb.CreateSessionRequest(model="lm-gru")).session_id for _ in range(5)]
        message = pb.PackedSteps(columns=True)
        message.step_columns.add(session_ids=ids[3:5], tags=[100, 101], tokens=[3, 4])  # well formed
        for fields in malformed:
            message.step_columns.add(session_ids=ids[:3], **fields)
        after = pb.PackedSteps(columns=True)
        after.step_columns.add(session_ids=ids, tags=[200, 201, 202, 203, 204], tokens=[1, 2, 3, 4, 5])
        answers = _in_stream_order(stub.PackedStepStream(iter([message, after]), timeout=30))
        positions = [stub.GetSession(pb.GetSessionRequest(session_id=sid)).position for sid in ids]
    refused = [(r.session_id, r.tag, r.error.code, r.error.reason) for r in answers if r.error.code]
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    want = [(ids[i], tag, invalid, "INVALID_STEP_COLUMNS") for i, tag in enumerate([1, 2, 0])]
    for fields in malformed[1:]:
        want += [(ids[i], tag, invalid, "INVALID_STEP_COLUMNS") for i, tag in enumerate(fields["tags"])]
    assert sorted(refused) == sorted(want)
    fine = {r.tag: r.position for r in answers if not r.error.code}
    assert fine == {100: 1, 101: 1, 200: 1, 201: 1, 202: 1, 203: 2, 204: 2}
    assert positions == [1, 1, 1, 2, 2]


def test_one_block_is_one_model_run(server, tiny_models):
    """A block of single-token rows of many sessions becomes one run, and each row's logits are
    those of the session's input so far."""
    _, torch_models = tiny_models
    model = torch_models["lm-lstm"]
    stats = run_counts(server, "lm-lstm")
    rng = np.random.default_rng(5)
    n = 20
    xs = [make_input(model, 2, rng) for _ in range(n)]

    async def run():
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.SeqServeStub(channel)
            ids = [(await stub.CreateSession(pb.CreateSessionRequest(model="lm-lstm"))).session_id for _ in range(n)]
            call = stub.PackedStepStream()
            got = {}
            for k in range(2):
                before = stats()
                message = pb.PackedSteps(columns=True)
                message.step_columns.add(
                    session_ids=ids,
                    tags=list(range(n)),
                    tokens=[int(x[k]) for x in xs],
                    expected_positions=[k] * n,
                    output=pb.OutputSpec(logits=True),
                )
                await call.write(message)
                answered = 0
                while answered < n:
                    for r in _in_stream_order([await call.read()]):
                        got[(r.session_id, k)] = rows_of(r)[-1]
                        answered += 1
                delta = stats() - before
            await call.done_writing()
            return ids, got, delta

    ids, got, delta = asyncio.run(run())
    assert delta.tolist() == [1, n, 0], "runs, rows and direct runs of the block"
    for i, sid in enumerate(ids):
        want = reference(model, xs[i])
        np.testing.assert_allclose(np.stack([got[(sid, 0)], got[(sid, 1)]]), want, atol=TOL)

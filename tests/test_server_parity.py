"""Stepping through the server gives PyTorch's logits, whatever shares the batches.

Many sessions on every served model run at once, each with its own sequence and chunking, over a
shared stream (pipelined, many sessions), their own streams, and unary calls; every position's
logits must match one whole-sequence PyTorch run within 1e-4.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import torch

from seqserve.server.api.app import ServerThread
from seqserve.server.config import ServerConfig
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)
ALL = pb.OutputSpec(logits=True, all_positions=True)
TOL = 1e-4


def reference(model, x: np.ndarray) -> np.ndarray:
    """Logits [seq, outputs] of one whole-sequence PyTorch run from the zero state."""
    inp = torch.from_numpy(x)[None]
    with torch.no_grad():
        logits, _ = model(inp, model.init_state(1))
    return logits[0].numpy()


def make_input(model, length: int, rng) -> np.ndarray:
    cfg = model.config
    if cfg.input_kind == "tokens":
        return rng.integers(0, cfg.input_dim, length).astype(np.int64)
    return rng.standard_normal((length, cfg.input_dim)).astype(np.float32)


def chunks(x: np.ndarray, rng, style: str) -> list[np.ndarray]:
    if style == "tokens":
        return [x[i : i + 1] for i in range(len(x))]
    if style == "whole":
        return [x]
    cuts, i = [], 0
    while i < len(x):
        n = int(rng.integers(1, 9))
        cuts.append(x[i : i + n])
        i += n
    return cuts


def session_plans(torch_models, count: int, rng, lengths: tuple[int, int], styles: tuple[str, ...]) -> list[dict]:
    """``count`` sessions over the models in turn, each an input of random length in ``lengths``
    and its pieces, chunked in the styles in turn."""
    names = sorted(torch_models)
    plans = []
    for i in range(count):
        name = names[i % len(names)]
        x = make_input(torch_models[name], int(rng.integers(*lengths)), rng)
        plans.append(dict(name=name, x=x, pieces=chunks(x, rng, styles[i % len(styles)])))
    return plans


def step_request(sid: str, chunk: np.ndarray, tag: int, position: int | None = None) -> pb.StepRequest:
    req = pb.StepRequest(session_id=sid, tag=tag, output=ALL)
    if chunk.dtype == np.int64:
        req.tokens.extend(chunk.tolist())
    else:
        req.features = chunk.astype("<f4").tobytes()
    if position is not None:
        req.expected_position = position
    return req


def rows_of(result: pb.StepResult) -> np.ndarray:
    assert not result.HasField("error"), result.error.message
    return np.frombuffer(result.logits, np.float32).reshape(result.steps, result.width)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """PyTorch references on one thread: its spinning worker threads crawl next to a busy server."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["on-loop", "in-thread"])
def server(request, tiny_models):
    """Model runs on the event loop (the CPU default) or on a worker thread (as with CUDA)."""
    models_dir, _ = tiny_models
    config = ServerConfig(
        models=str(models_dir),
        port=0,
        metrics_port=0,
        max_batch=64,
        max_wait_ms=1.0,
        run_in_thread=request.param == "in-thread",
    )
    with ServerThread(config) as srv:
        yield srv


def test_many_concurrent_sessions_match_pytorch(server, tiny_models):
    _, torch_models = tiny_models
    plans = session_plans(torch_models, 36, np.random.default_rng(7), (8, 40), ("tokens", "random", "whole"))
    for i, p in enumerate(plans):
        p["mode"] = ("shared", "own", "unary")[(i // 3) % 3]

    async def run() -> list[np.ndarray]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.SeqServeStub(channel)
            for p in plans:
                p["sid"] = (await stub.CreateSession(pb.CreateSessionRequest(model=p["name"]))).session_id
            got: dict[str, list[np.ndarray]] = {p["sid"]: [] for p in plans}

            async def shared_stream():
                call = stub.StepStream()
                queue = [(p, k) for p in plans if p["mode"] == "shared" for k in range(len(p["pieces"]))]
                positions = {p["sid"]: 0 for p in plans}
                order = sorted(range(len(queue)), key=lambda j: (queue[j][1], j))  # interleave sessions
                for j in order:  # pipelined: every step is sent before any result is read
                    p, k = queue[j]
                    await call.write(step_request(p["sid"], p["pieces"][k], tag=k, position=positions[p["sid"]]))
                    positions[p["sid"]] += len(p["pieces"][k])
                await call.done_writing()
                while (result := await call.read()) != grpc.aio.EOF:
                    got[result.session_id].append((result.tag, rows_of(result)))

            async def own_stream(p):
                call = stub.StepStream()
                for k, piece in enumerate(p["pieces"]):
                    await call.write(step_request(p["sid"], piece, tag=k))
                    result = await call.read()
                    got[p["sid"]].append((k, rows_of(result)))
                await call.done_writing()

            async def unary(p):
                for k, piece in enumerate(p["pieces"]):
                    got[p["sid"]].append((k, rows_of(await stub.Step(step_request(p["sid"], piece, tag=k)))))

            jobs = [shared_stream()] + [own_stream(p) for p in plans if p["mode"] == "own"]
            jobs += [unary(p) for p in plans if p["mode"] == "unary"]
            await asyncio.gather(*jobs)
            for p in plans:
                info = await stub.GetSession(pb.GetSessionRequest(session_id=p["sid"]))
                assert info.position == len(p["x"])
            return got

    # How these steps batch depends on how the server happens to read them (under load it can read
    # one per tick, and no run carries two sessions); that batching never changes a result is
    # proven where runs are formed deterministically: test_engine_runs.py.
    got = asyncio.run(run())
    for p in plans:
        tags = [tag for tag, _ in got[p["sid"]]]
        assert tags == list(range(len(p["pieces"]))), f"results out of order for {p['mode']} session"
        logits = np.concatenate([rows for _, rows in got[p["sid"]]])
        expected = reference(torch_models[p["name"]], p["x"])
        assert logits.shape == expected.shape
        diff = float(np.abs(logits - expected).max())
        assert diff < TOL, f"{p['name']} ({p['mode']}): max diff {diff}"


def test_lone_session_runs_at_once_and_batching_resumes_when_others_join(tiny_models):
    """A session stepping alone skips the queue (the latency path); as soon as other sessions step
    too, their steps go through the queue again (where they share runs as they arrive together:
    how many do depends on how the server reads them, so test_engine_runs.py checks the sharing
    itself). Logits stay PyTorch's either way."""
    models_dir, torch_models = tiny_models
    model = torch_models["lm-lstm"]
    rng = np.random.default_rng(11)
    # device cpu: the direct path is the CPU latency path (with CUDA every run goes to the model thread)
    with ServerThread(
        ServerConfig(models=str(models_dir), port=0, metrics_port=0, max_wait_ms=1.0, device="cpu")
    ) as srv:
        scheduler = srv.engine.scheduler(srv.engine.registry.get("lm-lstm"))

        def stats():
            return srv.call(lambda: (scheduler.stats.runs, scheduler.stats.rows, scheduler.stats.direct_runs))

        async def run():
            async with grpc.aio.insecure_channel(srv.address) as channel:
                stub = pb_grpc.SeqServeStub(channel)
                ids = [
                    (await stub.CreateSession(pb.CreateSessionRequest(model="lm-lstm"))).session_id for _ in range(9)
                ]
                xs = [make_input(model, 24, rng) for _ in ids]
                got = {sid: [] for sid in ids}
                call = stub.StepStream()  # the first session alone, one step at a time
                for k in range(24):
                    await call.write(step_request(ids[0], xs[0][k : k + 1], tag=k))
                    got[ids[0]].append(rows_of(await call.read()))
                alone = stats()
                for k in range(24):  # now eight more, pipelined on the same stream
                    for i in range(1, 9):
                        await call.write(step_request(ids[i], xs[i][k : k + 1], tag=k))
                await call.done_writing()
                while (result := await call.read()) != grpc.aio.EOF:
                    got[result.session_id].append(rows_of(result))
                return ids, xs, got, alone

        ids, xs, got, alone = asyncio.run(run())
        _, rows, direct = stats()
        assert alone[2] >= 20, f"only {alone[2]} of 24 lone steps ran at once"
        assert rows - alone[1] == 8 * 24
        assert direct == alone[2], "a step of the eight interleaved sessions took the lone path"
        for sid, x in zip(ids, xs):
            diff = float(np.abs(np.concatenate(got[sid]) - reference(model, x)).max())
            assert diff < TOL, f"session {ids.index(sid)}: max diff {diff}"


def test_lone_session_top_k_from_the_run_matches_pytorch(tiny_models):
    """A lone session's steps take their top-k from the model run's head (runtime.run_top_k):
    ids and log-probs of every step equal PyTorch's at that position, for any k, chunk or plan."""
    models_dir, torch_models = tiny_models
    specs = [
        None,
        pb.OutputSpec(),
        pb.OutputSpec(top_k=1),
        pb.OutputSpec(top_k=256),
        pb.OutputSpec(top_k=3, argmax=True, logits=True),
    ]  # None: no OutputSpec, the model's default
    with ServerThread(ServerConfig(models=str(models_dir), port=0, metrics_port=0, device="cpu")) as srv:
        for name in ("lm-lstm", "cls-lstm"):
            model, scheduler = torch_models[name], srv.engine.scheduler(srv.engine.registry.get(name))
            assert scheduler.head_top_k
            x = make_input(model, 40, np.random.default_rng(5))
            expected = reference(model, x)
            log_probs = expected - np.log(np.exp(expected.astype(np.float64)).sum(axis=1, keepdims=True))
            direct_before = srv.call(lambda: scheduler.stats.direct_runs)
            with grpc.insecure_channel(srv.address) as channel:
                stub = pb_grpc.SeqServeStub(channel)
                sid = stub.CreateSession(pb.CreateSessionRequest(model=name)).session_id
                end, pieces = 0, chunks(x, np.random.default_rng(6), "random")
                for i, piece in enumerate(pieces):
                    spec = specs[i % len(specs)]
                    request = pb.StepRequest(session_id=sid, tokens=piece.tolist())
                    if spec is not None:
                        request.output.CopyFrom(spec)
                    [result] = list(stub.StepStream(iter([request])))
                    assert not result.HasField("error"), (name, i, result.error.message)
                    end += len(piece)
                    spec = spec or pb.OutputSpec()
                    last, k = expected[end - 1], min(spec.top_k or 5, expected.shape[1])
                    assert list(result.top_k_ids) == np.argsort(-last, kind="stable")[:k].tolist(), (name, i)
                    np.testing.assert_allclose(
                        result.top_k_logprobs, log_probs[end - 1][list(result.top_k_ids)], atol=TOL
                    )
                    if spec.logits:
                        np.testing.assert_allclose(np.frombuffer(result.logits, np.float32), last, atol=TOL)
                        assert list(result.argmax) == [int(last.argmax())]
            # all but the first (a session's first step queues: it was not the last one to run)
            direct = srv.call(lambda: scheduler.stats.direct_runs) - direct_before
            assert direct == len(pieces) - 1, f"{direct} of {len(pieces)} lone steps took the direct path"


def test_default_output_is_small_top5_of_last_position(server, tiny_models):
    _, torch_models = tiny_models
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.SeqServeStub(channel)
    sid = stub.CreateSession(pb.CreateSessionRequest(model="lm-gru")).session_id
    x = np.array([3, 1, 4, 1, 5, 9, 2, 6], np.int64)
    result = stub.Step(pb.StepRequest(session_id=sid, tokens=x.tolist()))
    assert result.steps == 1 and result.width == 256 and result.position == len(x)
    assert not result.logits and not result.probs and not result.argmax and len(result.top_k_ids) == 5
    last = reference(torch_models["lm-gru"], x)[-1]
    log_probs = last - np.log(np.exp(last.astype(np.float64)).sum())
    assert list(result.top_k_ids) == np.argsort(-last)[:5].tolist()
    assert np.allclose(result.top_k_logprobs, log_probs[list(result.top_k_ids)], atol=TOL)
    channel.close()


def test_output_fields_are_what_was_asked(server, tiny_models):
    _, torch_models = tiny_models
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.SeqServeStub(channel)
    sid = stub.CreateSession(pb.CreateSessionRequest(model="cls-lstm")).session_id
    x = np.array([10, 20, 30], np.int64)
    spec = pb.OutputSpec(argmax=True, probs=True, top_k=2, all_positions=True)
    result = stub.Step(pb.StepRequest(session_id=sid, tokens=x.tolist(), output=spec))
    expected = reference(torch_models["cls-lstm"], x)
    probs = np.exp(expected) / np.exp(expected).sum(axis=1, keepdims=True)
    assert result.steps == 3 and result.width == 4 and not result.logits
    assert list(result.argmax) == expected.argmax(axis=1).tolist()
    assert np.allclose(np.frombuffer(result.probs, np.float32).reshape(3, 4), probs, atol=TOL)
    assert list(result.top_k_ids) == np.argsort(-expected, axis=1)[:, :2].ravel().tolist()
    none = stub.Step(pb.StepRequest(session_id=sid, tokens=[1], output=pb.OutputSpec(none=True)))
    assert none.position == 4 and not none.top_k_ids and not none.steps
    sampled = stub.Step(
        pb.StepRequest(session_id=sid, tokens=[2], output=pb.OutputSpec(sample=pb.Sampling(temperature=1.0, seed=5)))
    )
    assert len(sampled.sampled) == 1 and 0 <= sampled.sampled[0] < 4 and not sampled.top_k_ids
    channel.close()


def test_naive_mode_gives_the_same_logits(tiny_models):
    models_dir, torch_models = tiny_models
    rng = np.random.default_rng(3)
    with ServerThread(ServerConfig(models=str(models_dir), port=0, metrics_port=0, batching="off")) as srv:
        channel = grpc.insecure_channel(srv.address)
        stub = pb_grpc.SeqServeStub(channel)
        for name in ("lm-lstm", "feat-gru"):
            x = make_input(torch_models[name], 12, rng)
            sid = stub.CreateSession(pb.CreateSessionRequest(model=name)).session_id
            requests = [step_request(sid, piece, tag=k) for k, piece in enumerate(chunks(x, rng, "random"))]
            rows = np.concatenate([rows_of(r) for r in stub.StepStream(iter(requests))])
            assert float(np.abs(rows - reference(torch_models[name], x)).max()) < TOL
        channel.close()

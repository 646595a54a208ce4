"""Server-side generation: reproducible, equal to stepping, and it leaves the session's state right."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
import torch

from seqserve.server.api.app import ServerThread
from seqserve.server.config import ServerConfig
from seqserve.server.placement import OFFLOAD_ROWS
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)
PROMPT = [72, 101, 108, 108, 111, 32]
# max_generate_tokens of the servers here, and max_tokens of a generation that must still be running
# when the test looks: it cannot end during a test (each one is cancelled)
ENDLESS = 1_000_000


def wait_for(predicate, what: str, timeout: float = 10.0) -> None:
    """Wait for a server state, polling, failing after a generous ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.01)


def torch_logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits, _ = model(torch.tensor([tokens], dtype=torch.int64), model.init_state(1))
    return logits[0].numpy()


def torch_greedy(model, prompt: list[int], count: int) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        logits, state = model(torch.tensor([prompt]), model.init_state(1))
        for _ in range(count):
            token = int(logits[0, -1].argmax())
            out.append(token)
            logits, state = model(torch.tensor([[token]]), state)
    return out


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """PyTorch references on one thread: its spinning worker threads crawl next to a busy server."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["cpu-default", "in-thread"])
def server(request, tiny_models):
    """The CPU default, and everything model-related on the model thread (as with CUDA: step runs
    and the cohorts' state moves too). Messages are never flushed by time (their chunking is then
    exact whatever the machine's speed)."""
    models_dir, _ = tiny_models
    config = ServerConfig(
        models=str(models_dir),
        port=0,
        metrics_port=0,
        generate_flush_ms=3_600_000.0,
        max_generate_tokens=ENDLESS,
        run_in_thread=request.param == "in-thread",
    )
    with ServerThread(config) as srv:
        yield srv


@pytest.fixture
def stub(server):
    channel = grpc.insecure_channel(server.address)
    yield pb_grpc.SeqServeStub(channel)
    channel.close()


def new_session(stub, model: str = "lm-lstm") -> str:
    return stub.CreateSession(pb.CreateSessionRequest(model=model)).session_id


def generate(stub, sid: str, **fields) -> tuple[list[int], list[pb.GenerateResponse]]:
    messages = list(stub.Generate(pb.GenerateRequest(session_id=sid, **fields)))
    return [t for m in messages for t in m.tokens], messages


def test_greedy_generation_equals_argmax_chain_and_state_includes_it(stub, tiny_models):
    _, models = tiny_models
    model = models["lm-lstm"]
    sid = new_session(stub)
    tokens, messages = generate(stub, sid, prompt=PROMPT, max_tokens=20)
    assert tokens == torch_greedy(model, PROMPT, 20)
    assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert messages[-1].position == len(PROMPT) + 20
    assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).position == len(PROMPT) + 20
    # the next step continues from prompt + generated tokens
    after = stub.Step(pb.StepRequest(session_id=sid, tokens=[65], output=pb.OutputSpec(logits=True)))
    expected = torch_logits(model, PROMPT + tokens + [65])[-1]
    assert np.abs(np.frombuffer(after.logits, np.float32) - expected).max() < 1e-4

    # the same chain by hand through unary steps
    other = new_session(stub)
    step = stub.Step(pb.StepRequest(session_id=other, tokens=PROMPT, output=pb.OutputSpec(argmax=True)))
    chain = []
    for _ in range(20):
        chain.append(step.argmax[0])
        step = stub.Step(pb.StepRequest(session_id=other, tokens=[chain[-1]], output=pb.OutputSpec(argmax=True)))
    assert chain == tokens


def test_generation_without_prompt_continues_from_last_step(stub, tiny_models):
    _, models = tiny_models
    sid = new_session(stub, "lm-gru")
    stub.Step(pb.StepRequest(session_id=sid, tokens=PROMPT))
    tokens, messages = generate(stub, sid, max_tokens=7)
    assert tokens == torch_greedy(models["lm-gru"], PROMPT, 7)
    assert messages[-1].position == len(PROMPT) + 7
    more, _ = generate(stub, sid, max_tokens=3)
    assert tokens + more == torch_greedy(models["lm-gru"], PROMPT, 10)


def test_seeded_sampling_is_reproducible_while_batched_with_others(server):
    sampling = pb.Sampling(temperature=0.9, top_k=40, top_p=0.95, seed=1234)

    async def run() -> list[list[int]]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.SeqServeStub(channel)

            async def one(seed: int | None, max_tokens: int) -> list[int]:
                sid = (await stub.CreateSession(pb.CreateSessionRequest(model="lm-lstm"))).session_id
                s = pb.Sampling()
                s.CopyFrom(sampling)
                if seed is None:
                    s.ClearField("seed")
                else:
                    s.seed = seed
                call = stub.Generate(
                    pb.GenerateRequest(session_id=sid, prompt=PROMPT, max_tokens=max_tokens, sampling=s)
                )
                return [t async for m in call for t in m.tokens]

            return await asyncio.gather(one(1234, 60), one(None, 90), one(1234, 60), one(None, 30), one(99, 60))

    first = asyncio.run(run())
    second = asyncio.run(run())
    assert first[0] == first[2] == second[0] == second[2]
    assert first[4] == second[4]
    assert len(first[0]) == 60 and len(first[1]) == 90
    assert first[0] != first[4]


def test_many_generations_across_lanes_match_their_own_chains(server, tiny_models):
    """Generations in lanes large enough for the model thread; rows join and leave mid-flight
    (different lengths, one call cancelled): every chain is still its own. Endless generations
    hold both lanes at that size before the others start, so the others' tokens come from the
    model thread however the server happens to batch their calls."""
    _, models = tiny_models
    model = models["lm-lstm"]
    prompts = [[(7 * i + j) % 251 + 1 for j in range(1 + i % 5)] for i in range(24)]
    lengths = [40 + 5 * (i % 7) for i in range(24)]
    scheduler = server.call(lambda: server.engine.scheduler(server.engine.registry.get("lm-lstm")))

    async def run() -> tuple[list[list[int]], int, int]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.SeqServeStub(channel)
            ids = [(await stub.CreateSession(pb.CreateSessionRequest(model="lm-lstm"))).session_id for _ in prompts]
            anchors = []
            for i in range(2 * OFFLOAD_ROWS):
                sid = (await stub.CreateSession(pb.CreateSessionRequest(model="lm-lstm"))).session_id
                anchors.append(
                    stub.Generate(
                        pb.GenerateRequest(session_id=sid, prompt=[i + 1], max_tokens=ENDLESS, tokens_per_message=256)
                    )
                )
                await anchors[-1].read()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while not server.call(lambda: all(len(lane) >= OFFLOAD_ROWS for lane in scheduler.lanes)):
                assert loop.time() < deadline, "the anchors never filled both lanes"
                await asyncio.sleep(0.01)
            thread_runs = server.call(lambda: sum(lane.thread_runs for lane in scheduler.lanes))

            async def one(i: int) -> list[int]:
                call = stub.Generate(
                    pb.GenerateRequest(
                        session_id=ids[i], prompt=prompts[i], max_tokens=lengths[i], tokens_per_message=4
                    )
                )
                return [t async for m in call for t in m.tokens]

            async def cancelled() -> int:
                sid = (await stub.CreateSession(pb.CreateSessionRequest(model="lm-lstm"))).session_id
                call = stub.Generate(
                    pb.GenerateRequest(session_id=sid, prompt=PROMPT, max_tokens=ENDLESS, tokens_per_message=1)
                )
                async for _ in call:
                    break
                call.cancel()
                return sid

            *chains, gone = await asyncio.gather(*(one(i) for i in range(24)), cancelled())
            after = server.call(lambda: sum(lane.thread_runs for lane in scheduler.lanes))
            for call in anchors:
                call.cancel()
            return chains, after - thread_runs, gone

    chains, thread_runs, gone = asyncio.run(run())
    for i, chain in enumerate(chains):
        assert chain == torch_greedy(model, prompts[i], lengths[i]), f"generation {i}"
    assert thread_runs >= 40  # the chains' rounds (40 tokens or more) went to the model thread
    # the cancelled ones (and the anchors) leave at their lane's next round
    wait_for(lambda: server.call(lambda: scheduler.idle), "the cancelled generations to leave their lanes")
    assert not server.call(lambda: server.engine.get_session(gone).generating)


def test_stop_sequence_ends_generation_after_it(stub):
    sampling = pb.Sampling(temperature=1.0, seed=7)
    chain, _ = generate(stub, new_session(stub, "lm-rnn"), prompt=PROMPT, max_tokens=40, sampling=sampling)
    # a two-byte stop whose first occurrence in the generated bytes ends at index `end` (>= 3)
    end = next(i for i in range(3, 40) if bytes(chain[i - 1 : i + 1]) not in bytes(chain[:i]))
    stop = bytes(chain[end - 1 : end + 1])
    sid = new_session(stub, "lm-rnn")
    tokens, messages = generate(
        stub, sid, prompt=PROMPT, max_tokens=40, sampling=sampling, stop=[b"\x00\x01\x02", stop]
    )
    assert tokens == chain[: end + 1]
    assert messages[-1].finish_reason == pb.FINISH_REASON_STOP
    assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).position == len(PROMPT) + end + 1


def test_max_tokens_and_message_chunking(stub):
    sid = new_session(stub)
    tokens, messages = generate(
        stub, sid, prompt=PROMPT, max_tokens=23, tokens_per_message=4, sampling=pb.Sampling(temperature=1.0)
    )
    assert len(tokens) == 23 and all(0 <= t < 256 for t in tokens)
    assert [len(m.tokens) for m in messages[:-1]] == [4] * (len(messages) - 1)
    assert len(messages) >= 6 and messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
    positions = [m.position for m in messages]
    assert positions == sorted(positions) and positions[-1] == len(PROMPT) + 23


def test_generate_refusals(stub):
    cls = new_session(stub, "cls-lstm")
    lm = new_session(stub)
    cases = [
        (
            pb.GenerateRequest(session_id=cls, prompt=[1], max_tokens=3),
            grpc.StatusCode.INVALID_ARGUMENT,
            "language model",
        ),
        (pb.GenerateRequest(session_id=lm, prompt=[1], max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (
            pb.GenerateRequest(session_id=lm, prompt=[1], max_tokens=ENDLESS + 1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_tokens",
        ),
        (
            pb.GenerateRequest(session_id=lm, prompt=[1], max_tokens=3, sampling=pb.Sampling(temperature=-1)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
        (
            pb.GenerateRequest(session_id=lm, prompt=[1], max_tokens=3, sampling=pb.Sampling(temperature=1, top_p=1.5)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "top_p",
        ),
        (pb.GenerateRequest(session_id=lm, prompt=[300], max_tokens=3), grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
        (
            pb.GenerateRequest(session_id=lm, prompt=[1], max_tokens=3, stop=[b""]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "stop",
        ),
        (pb.GenerateRequest(session_id=lm, max_tokens=3), grpc.StatusCode.FAILED_PRECONDITION, "position 0"),
        (
            pb.GenerateRequest(session_id=lm, prompt=[1], max_tokens=3, expected_position=4),
            grpc.StatusCode.FAILED_PRECONDITION,
            "expected position 4",
        ),
        (pb.GenerateRequest(session_id="missing", prompt=[1], max_tokens=3), grpc.StatusCode.NOT_FOUND, "missing"),
    ]
    for request, code, words in cases:
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(request))
        assert info.value.code() == code, request
        assert words in info.value.details()
    assert stub.GetSession(pb.GetSessionRequest(session_id=lm)).position == 0


def test_steps_are_refused_while_generating_and_cancel_frees_the_session(stub):
    sid = new_session(stub)
    call = stub.Generate(pb.GenerateRequest(session_id=sid, prompt=PROMPT, max_tokens=ENDLESS, tokens_per_message=1))
    first = next(call)
    assert len(first.tokens) == 1
    assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).generating
    with pytest.raises(grpc.RpcError) as info:
        stub.Step(pb.StepRequest(session_id=sid, tokens=[1]))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "generating" in info.value.details()
    call.cancel()
    # the server notices the cancel at its lane's next round; then steps are accepted again
    wait_for(lambda: not stub.GetSession(pb.GetSessionRequest(session_id=sid)).generating, "the generation to stop")
    position = stub.GetSession(pb.GetSessionRequest(session_id=sid)).position
    result = stub.Step(pb.StepRequest(session_id=sid, tokens=[1], expected_position=position))
    info = stub.GetSession(pb.GetSessionRequest(session_id=sid))
    assert result.position == info.position == position + 1 and not info.generating
    assert len(PROMPT) + 1 <= position < len(PROMPT) + ENDLESS


def test_naive_mode_generation(tiny_models):
    models_dir, models = tiny_models
    config = ServerConfig(models=str(models_dir), port=0, metrics_port=0, batching="off", generate_flush_ms=60000.0)
    with ServerThread(config) as srv:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.SeqServeStub(channel)
            sid = new_session(stub, "lm-gru")
            tokens, messages = generate(stub, sid, prompt=PROMPT, max_tokens=12, tokens_per_message=5)
            assert tokens == torch_greedy(models["lm-gru"], PROMPT, 12)
            assert [len(m.tokens) for m in messages] == [5, 5, 2]
            more, _ = generate(stub, sid, max_tokens=3)
            assert tokens + more == torch_greedy(models["lm-gru"], PROMPT, 15)
            stats = srv.call(lambda: srv.engine.scheduler(srv.engine.registry.get("lm-gru")).stats)
            assert stats.rows == stats.runs  # one session per run

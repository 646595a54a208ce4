"""Multiplexed StepStream: hundreds of sessions over one stream, bounded in flight, results by tag.

The tests taking ``flavour`` run on both StepStream and AsyncStepStream (see test_client_sdk.py);
the last one runs the asyncio stream the asyncio way, with tasks.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from seqserve.client import AsyncClient, Cancelled, InvalidInput, SessionNotFound
from tests.client_support import FLAVOURS, flavour_fixture, shared_server
from tests.proxy_support import TcpProxy

MODEL = "lm-gru"
STEPS, LEN = 3, 4


@pytest.fixture(scope="module")
def server(request, tiny_models):
    return shared_server(request, tiny_models[0])


@pytest.fixture(params=FLAVOURS)
def flavour(request):
    yield from flavour_fixture(request)


def reference_logits(model, tokens: np.ndarray) -> np.ndarray:
    """Logits after each step's last token: [sessions, STEPS, vocab]."""
    n = tokens.shape[0]
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(tokens.reshape(n, STEPS * LEN)).long(), model.init_state(n))
    return logits.numpy()[:, LEN - 1 :: LEN, :]


def test_stream_many_sessions(server, flavour, tiny_models):
    n, window = 300, 64
    tokens = np.random.default_rng(1).integers(0, 256, size=(n, STEPS, LEN))
    expected = reference_logits(tiny_models[1][MODEL], tokens)
    with flavour.client(server.target, timeout=30) as client:
        sessions = [client.session(MODEL) for _ in range(n)]
        try:
            peak = 0
            with client.stream(window=window) as stream:
                futures = []
                for i, s in enumerate(sessions):  # every step of a session queued at once: order kept per session
                    for k in range(STEPS):
                        futures.append((i, k, stream.submit(s, tokens[i, k], logits=True)))
                        peak = max(peak, stream.outstanding)
                for i, k, fut in futures:
                    r = fut.result(timeout=60)
                    assert r.session_id == sessions[i].id and r.position == (k + 1) * LEN
                    np.testing.assert_allclose(r.logits[0], expected[i, k], atol=1e-4)
                assert stream.outstanding == 0
            assert peak <= window  # submit waited at the window instead of buffering more
            if flavour.name == "sync":
                # Submitting from one thread outpaces the answers, so the window fills. (Driven from
                # another thread, the asyncio stream answers as fast as it is fed; the asyncio test
                # below fills its window with tasks.)
                assert peak == window
            assert all(s.position == STEPS * LEN for s in sessions)
            assert {client.get_session(sessions[j].id).position for j in (0, n // 2, n - 1)} == {STEPS * LEN}
        finally:
            for s in sessions:
                s.close()


def test_stream_errors_stay_per_step(server, flavour):
    with flavour.client(server.target, timeout=30) as client:
        good, bad = client.session(MODEL), client.session(MODEL)
        gone = client.session(MODEL)
        client.close_session(gone.id)  # closed behind the Session object's back
        with client.stream(window=8) as stream:
            f_bad = stream.submit(bad, [1, 999])
            f_gone = stream.submit(gone, [1])
            f_good = stream.submit(good, "ok")
            with pytest.raises(InvalidInput) as bad_info:
                f_bad.result(timeout=30)
            with pytest.raises(SessionNotFound) as gone_info:
                f_gone.result(timeout=30)
            assert bad_info.value.reason == "TOKEN_OUT_OF_RANGE" and gone_info.value.reason == "SESSION_CLOSED"
            assert f_good.result(timeout=30).position == 2
            assert stream.step(bad, "fine").position == 4  # the failed step did not advance it
        good.close()
        bad.close()


def test_cancelled_future_does_not_stop_the_stream(server, flavour):
    with flavour.client(server.target, timeout=30) as client, client.session(MODEL) as s:
        with client.stream(window=8) as stream:
            first = stream.submit(s, "ab")
            second = stream.submit(s, "cd")  # waits behind the first: still pending
            assert second.cancel()
            third = stream.submit(s, "e")
            # The cancelled step still ran (only its caller stopped waiting) and the stream carried on.
            assert third.result(timeout=30).position == 5 == s.position
            assert first.result(timeout=30).position == 2 and second.cancelled()
            assert stream.outstanding == 0


def test_close_waits_for_steps_then_cancels_what_is_left(server, flavour):
    proxy = TcpProxy(server.port)
    try:
        with flavour.client(proxy.target, timeout=30) as client, flavour.client(server.target) as direct:
            s = client.session(MODEL)
            stream = client.stream(window=4)
            assert stream.step(s, "ab").position == 2
            proxy.swallow_replies_then_cut()  # the next answer is lost and the connection cut...
            proxy.hold()  # ...and the stream's reconnection waits
            lost = stream.submit(s, "cd")
            deadline = time.monotonic() + 15
            while proxy.cuts < 1:
                assert time.monotonic() < deadline, "the connection was never cut"
                time.sleep(0.02)
            started = time.monotonic()
            stream.close(timeout=0.5)
            assert time.monotonic() - started < 8
            with pytest.raises(Cancelled):
                lost.result(timeout=10)
            with pytest.raises(ValueError, match="closed"):
                stream.submit(s, "x")
            assert direct.get_session(s.id).position == 4  # the server applied it; only the answer was lost
            direct.close_session(s.id)
    finally:
        proxy.close()


def test_leaving_the_block_on_an_error_cancels_the_steps(server, flavour):
    proxy = TcpProxy(server.port)
    try:
        with flavour.client(proxy.target, timeout=30) as client:
            s = client.session(MODEL)
            with pytest.raises(RuntimeError, match="boom"):
                with client.stream(window=4) as stream:
                    stream.step(s, "ab")
                    proxy.swallow_replies_then_cut()
                    proxy.hold()
                    lost = stream.submit(s, "cd")
                    deadline = time.monotonic() + 15
                    while proxy.cuts < 1:
                        assert time.monotonic() < deadline, "the connection was never cut"
                        time.sleep(0.02)
                    raise RuntimeError("boom")  # the caller's error, not the stream's, comes out
            with pytest.raises(Cancelled):
                lost.result(timeout=10)
    finally:
        proxy.close()


async def _async_many(target: str, tokens: np.ndarray, window: int) -> tuple[list[list[np.ndarray]], int]:
    async with AsyncClient(target, timeout=30) as client:
        sessions = await asyncio.gather(*(client.session(MODEL) for _ in range(tokens.shape[0])))
        peak = 0
        async with client.stream(window=window) as stream:

            async def run(i: int) -> list[np.ndarray]:
                nonlocal peak
                out = []
                for k in range(STEPS):
                    fut = await stream.submit(sessions[i], tokens[i, k], logits=True)
                    peak = max(peak, stream.outstanding)
                    r = await fut
                    assert r.position == (k + 1) * LEN == sessions[i].position
                    out.append(r.logits[0])
                return out

            results = await asyncio.gather(*(run(i) for i in range(tokens.shape[0])))
            with pytest.raises(InvalidInput):
                await stream.step(sessions[0], [256])
        await asyncio.gather(*(s.close() for s in sessions))
        return results, peak


def test_async_stream_many_sessions(server, tiny_models):
    n, window = 200, 32
    tokens = np.random.default_rng(2).integers(0, 256, size=(n, STEPS, LEN))
    expected = reference_logits(tiny_models[1][MODEL], tokens)
    results, peak = asyncio.run(_async_many(server.target, tokens, window))
    assert peak == window
    np.testing.assert_allclose(np.array(results), expected, atol=1e-4)


def test_steps_waiting_together_leave_as_column_blocks():
    """packed_steps: token steps that ask for the same output (two or more) become one StepColumns
    block, with expected positions and lengths only where they are needed; a lone step and
    feature frames go as StepRequests; every step is in the message once."""
    from seqserve.client.messages import to_step_input
    from seqserve.client.mux_core import MuxBook, MuxItem, packed_steps
    from seqserve.client.session_base import SessionBase
    from seqserve.client.types import Output, SessionInfo

    book = MuxBook()

    def item(n: int, inputs, output: Output, position: int | None = 0) -> MuxItem:
        session = SessionBase(SessionInfo(f"s{n}", MODEL, 1, 3 * n, 0, 0, 0))
        it = book.add(MuxItem(book.new_tag(), session, to_step_input(inputs), output, None))  # type: ignore[arg-type]
        assert it is not None
        if position is None:
            it.expected = None
        return it

    top3, logits = Output(top_k=3), Output(logits=True)
    items = [
        item(0, [7], top3),
        item(1, [8], Output(top_k=3)),  # equal to top3: the same block
        item(2, [9, 10], top3),
        item(3, [11], logits),  # alone in its output: a StepRequest
        item(4, np.zeros((2, 3), np.float32), top3),  # frames: a StepRequest
        item(5, [12], Output(), None),
        item(6, [13], Output(), None),
    ]
    message = packed_steps(items)
    assert message.columns
    assert [(r.session_id, r.tag, list(r.tokens), r.output.logits) for r in message.steps] == [
        ("s4", 5, [], False),
        ("s3", 4, [11], True),
    ]
    assert message.steps[0].features == np.zeros((2, 3), np.float32).tobytes()
    first, second = message.step_columns
    assert (list(first.session_ids), list(first.tags), list(first.tokens)) == (
        ["s0", "s1", "s2"],
        [1, 2, 3],
        [7, 8, 9, 10],
    )
    assert list(first.lengths) == [1, 1, 2] and list(first.expected_positions) == [0, 3, 6]
    assert first.output.top_k == 3
    assert (list(second.session_ids), list(second.tokens), list(second.tags)) == (["s5", "s6"], [12, 13], [6, 7])
    assert not second.lengths and not second.expected_positions
    assert second.output.top_k == 0 and not second.output.none  # Output(): the server's default

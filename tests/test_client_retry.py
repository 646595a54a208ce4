"""Exactly-once resends: the connection is cut mid-call by a TCP proxy between client and server.

The server keeps sessions in memory, so instead of restarting it the tests cut the proxy: a step
reaches the server and is applied, its reply is dropped, the client resends, and the session must
have advanced once, not twice.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from seqserve.client import AsyncClient, Client, ClientConfig, Unavailable, encode_text
from tests.client_support import TcpProxy, shared_server


@pytest.fixture(scope="module")
def server(request, tiny_models):
    return shared_server(request, tiny_models[0])


@pytest.fixture()
def proxy(server):
    p = TcpProxy(server.port)
    yield p
    p.close()


def _wait_for(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _last_logits(model, text: str) -> np.ndarray:
    with torch.no_grad():
        logits, _ = model(torch.tensor([encode_text(text)]), model.init_state(1))
    return logits[0, -1].numpy()


def test_lost_reply_is_resent_without_advancing_twice(server, proxy, tiny_models):
    with Client(proxy.target, timeout=30) as c, Client(server.target) as direct:
        s = c.session("lm-lstm")
        s.step("abc")
        proxy.swallow_replies_then_cut()  # the next reply is dropped and the connection cut
        proxy.hold()  # the resend's new connection waits until we have looked at the server
        outcome: dict = {}
        worker = threading.Thread(target=lambda: outcome.update(r=s.step("defg", logits=True)))
        worker.start()
        _wait_for(lambda: proxy.cuts >= 1, what="the cut")
        # The server applied the step although its reply never reached the client.
        _wait_for(lambda: direct.get_session(s.id).position == 7, what="the step to be applied")
        proxy.release()
        worker.join(timeout=30)
        r = outcome["r"]
        assert r.position == s.position == 7
        assert direct.get_session(s.id).position == 7  # not 11: the resend did not apply it again
        assert proxy.connections >= 2  # the answer came over a new connection
        np.testing.assert_allclose(r.logits[0], _last_logits(tiny_models[1]["lm-lstm"], "abcdefg"), atol=1e-4)
        assert s.step("h").position == 8
        s.close()


def test_stream_resends_on_a_new_stream_exactly_once(server, proxy, tiny_models):
    n, steps = 40, 3
    tokens = np.random.default_rng(3).integers(0, 256, size=(n, steps, 2))
    model = tiny_models[1]["lm-gru"]
    with Client(proxy.target, timeout=30) as c, Client(server.target) as direct:
        sessions = [c.session("lm-gru") for _ in range(n)]
        with c.stream(window=n * steps) as stream:  # room for every step: submit never blocks here
            proxy.swallow_replies_then_cut()
            proxy.hold()
            futures = [(i, k, stream.submit(sessions[i], tokens[i, k], logits=True))
                       for k in range(steps) for i in range(n)]
            _wait_for(lambda: proxy.cuts >= 1, what="the cut")
            _wait_for(lambda: direct.get_session(sessions[0].id).position > 0, what="steps applied before the cut")
            proxy.release()
            results = {(i, k): f.result(timeout=60) for i, k, f in futures}
        with torch.no_grad():
            logits, _ = model(torch.from_numpy(tokens.reshape(n, -1)).long(), model.init_state(n))
        for (i, k), r in results.items():
            assert r.position == 2 * (k + 1)
            np.testing.assert_allclose(r.logits[0], logits[i, 2 * k + 1].numpy(), atol=1e-4)
        assert [direct.get_session(s.id).position for s in sessions] == [2 * steps] * n
        assert proxy.connections >= 2
        for s in sessions:
            s.close()


def test_refused_connection_is_retried_for_generate(server, proxy):
    with Client(server.target) as direct, direct.session("lm-rnn") as ref:
        expected = list(ref.generate("seed", max_tokens=30, seed=4))
    with Client(proxy.target, timeout=30) as c, c.session("lm-rnn") as s:
        proxy.cut()  # drop the live connection; the next one is refused
        proxy.refuse(1)
        gen = s.generate("seed", max_tokens=30, seed=4)
        assert list(gen) == expected and s.position == 34
        assert proxy.connections >= 3


def test_connection_lost_mid_generation(tiny_models):
    """The connection is cut after the first piece of a generation that cannot have finished by
    then (in-process server allowing a million tokens): the call fails, nothing is resent blindly,
    and the session re-reads its position before its next call."""
    from seqserve.server.api.app import ServerThread
    from seqserve.server.config import ServerConfig

    endless = 1_000_000
    with ServerThread(ServerConfig(models=str(tiny_models[0]), port=0, max_generate_tokens=endless)) as srv:
        proxy = TcpProxy(srv.port)
        try:
            _lose_connection_mid_generation(proxy, endless)
        finally:
            proxy.close()


def _lose_connection_mid_generation(proxy: TcpProxy, endless: int) -> None:
    with Client(proxy.target, timeout=30, max_retries=2, config=ClientConfig(generate_timeout=60)) as c:
        s = c.session("lm-gru")
        gen = s.generate("xy", max_tokens=endless, temperature=1.0, seed=1)
        with pytest.raises(Unavailable):
            for _ in gen:
                proxy.cut()  # after the first piece: tokens already arrived, so no blind resend
        assert 1 <= s.position < endless
        r = s.step("y")  # the session re-reads its position from the server before the next call
        assert r.position == s.position == c.get_session(s.id).position
        s.close()


def test_unreachable_after_retries(server, proxy):
    with Client(proxy.target, timeout=10, max_retries=2) as c:
        s = c.session("lm-rnn")
        s.step("a")
        proxy.close()
        with pytest.raises(Unavailable):
            s.step("b")
        assert s.position == 1


async def _async_lost_reply(proxy: TcpProxy, direct_target: str) -> None:
    async with AsyncClient(proxy.target, timeout=30) as c, AsyncClient(direct_target) as direct:
        s = await c.session("lm-lstm")
        await s.step("ab")
        proxy.swallow_replies_then_cut()
        proxy.hold()
        task = asyncio.ensure_future(s.step("cd"))
        deadline = time.monotonic() + 15
        while (await direct.get_session(s.id)).position != 4:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        proxy.release()
        r = await asyncio.wait_for(task, 30)
        assert r.position == 4 == (await direct.get_session(s.id)).position
        async with c.stream(window=4) as stream:
            proxy.swallow_replies_then_cut()
            r = await stream.step(s, "ef")
        assert r.position == 6 == (await direct.get_session(s.id)).position
        await s.close()


def test_async_resends_exactly_once(server, proxy):
    asyncio.run(_async_lost_reply(proxy, server.target))

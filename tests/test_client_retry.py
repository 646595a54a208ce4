"""Exactly-once resends: the connection is cut mid-call by a TCP proxy between client and server.

The server keeps sessions in memory, so instead of restarting it the tests cut the proxy: a step
reaches the server and is applied, its reply is dropped, the client resends, and the session must
have advanced once, not twice. Every test runs on both flavours (see test_client_sdk.py).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from seqserve.client import ClientConfig, Unavailable, encode_text
from tests.client_support import FLAVOURS, flavour_fixture, shared_server
from tests.proxy_support import TcpProxy


@pytest.fixture(scope="module")
def server(request, tiny_models):
    return shared_server(request, tiny_models[0])


@pytest.fixture(params=FLAVOURS)
def flavour(request):
    yield from flavour_fixture(request)


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


def test_lost_reply_is_resent_without_advancing_twice(server, proxy, flavour, tiny_models):
    with flavour.client(proxy.target, timeout=30) as c, flavour.client(server.target) as direct:
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


def test_stream_resends_on_a_new_stream_exactly_once(server, proxy, flavour, tiny_models):
    n, steps = 40, 3
    tokens = np.random.default_rng(3).integers(0, 256, size=(n, steps, 2))
    model = tiny_models[1]["lm-gru"]
    with flavour.client(proxy.target, timeout=30) as c, flavour.client(server.target) as direct:
        sessions = [c.session("lm-gru") for _ in range(n)]
        with c.stream(window=n * steps) as stream:  # room for every step: submit never blocks here
            # the stream's call is open and answering first (a packed stream writes nothing before
            # the server's first metadata): the replies lost below are results of applied steps
            warm = c.session("lm-gru")
            stream.step(warm, [1])
            proxy.swallow_replies_then_cut()
            proxy.hold()
            futures = [
                (i, k, stream.submit(sessions[i], tokens[i, k], logits=True)) for k in range(steps) for i in range(n)
            ]
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


def test_refused_connection_is_retried_for_generate(server, proxy, flavour):
    with flavour.client(server.target) as direct, direct.session("lm-rnn") as ref:
        expected = list(ref.generate("seed", max_tokens=30, seed=4))
    with flavour.client(proxy.target, timeout=30) as c, c.session("lm-rnn") as s:
        proxy.cut()  # drop the live connection; the next one is refused
        proxy.refuse(1)
        gen = s.generate("seed", max_tokens=30, seed=4)
        assert list(gen) == expected and s.position == 34
        assert proxy.connections >= 3


def test_connection_lost_mid_generation(tiny_models, flavour):
    """The connection is cut after the first piece of a generation that cannot have finished by
    then (in-process server allowing a million tokens): the call fails, nothing is resent blindly,
    and the session re-reads its position before its next call."""
    from seqserve.server.api.app import ServerThread
    from seqserve.server.config import ServerConfig

    endless = 1_000_000
    with ServerThread(
        ServerConfig(models=str(tiny_models[0]), port=0, metrics_port=0, max_generate_tokens=endless)
    ) as srv:
        proxy = TcpProxy(srv.port)
        try:
            _lose_connection_mid_generation(proxy, flavour, endless)
        finally:
            proxy.close()


def _lose_connection_mid_generation(proxy: TcpProxy, flavour, endless: int) -> None:
    with flavour.client(proxy.target, timeout=30, max_retries=2, config=ClientConfig(generate_timeout=60)) as c:
        s = c.session("lm-gru")
        gen = s.generate("xy", max_tokens=endless, temperature=1.0, seed=1)
        with pytest.raises(Unavailable):
            for _ in gen:
                proxy.cut()  # after the first piece: tokens already arrived, so no blind resend
        assert 1 <= s.position < endless
        r = s.step("y")  # the session re-reads its position from the server before the next call
        assert r.position == s.position == c.get_session(s.id).position
        s.close()


def test_unreachable_after_retries(server, proxy, flavour):
    with flavour.client(proxy.target, timeout=10, max_retries=2) as c:
        s = c.session("lm-rnn")
        s.step("a")
        proxy.close()
        with pytest.raises(Unavailable):
            s.step("b")
        assert s.position == 1


def _in_background(call) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except Exception as exc:  # reported by the test
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    return worker, outcome


def test_lost_replies_of_create_and_close_are_recovered(server, proxy, flavour):
    """A resend of CreateSession (own id) or CloseSession after a lost reply finds the first send's work
    done; the SDK takes that as the answer instead of failing with ALREADY_EXISTS / NOT_FOUND."""
    with flavour.client(proxy.target, timeout=30) as c, flavour.client(server.target) as direct:
        c.models()  # connected
        proxy.swallow_replies_then_cut()
        proxy.hold()
        worker, outcome = _in_background(lambda: c.session("lm-rnn", session_id="retry-create"))
        _wait_for(lambda: proxy.cuts >= 1, what="the cut")
        _wait_for(lambda: direct.get_session("retry-create").position == 0, what="the session to be created")
        proxy.release()
        worker.join(timeout=30)
        s = outcome["value"]
        assert s.id == "retry-create" and s.position == 0

        s.step("abc")
        proxy.swallow_replies_then_cut()
        proxy.hold()
        worker, outcome = _in_background(lambda: c.close_session("retry-create"))
        _wait_for(lambda: proxy.cuts >= 1, what="the cut")
        proxy.release()
        worker.join(timeout=30)
        assert outcome == {"value": None}  # closed by the first send: no final position to report
        assert [m.name for m in direct.models()]  # the server is fine
        assert s.close() == 3 and s.closed  # already gone on the server: not an error

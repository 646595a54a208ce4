"""Every public SDK call against a real server, in both flavours; numbers checked against the PyTorch models.

Each test body is written once against the blocking API and runs twice: on ``Client`` and on
``AsyncClient`` driven through tests.client_support.Blocking, which translates only the asyncio
protocol (await, async for, async with). A difference between the flavours fails the test.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from seqserve.client import (
    ClientConfig,
    DeadlineExceeded,
    ModelNotFound,
    Output,
    PositionMismatch,
    Sampling,
    SessionNotFound,
    TlsConfig,
    Unavailable,
    decode_tokens,
    encode_text,
)
from tests.client_support import FLAVOURS, flavour_fixture, shared_server

ATOL = 1e-4


@pytest.fixture(scope="module")
def server(request, tiny_models):
    return shared_server(request, tiny_models[0])


@pytest.fixture(params=FLAVOURS)
def flavour(request):
    yield from flavour_fixture(request)


@pytest.fixture()
def client(server, flavour):
    with flavour.client(server.target, timeout=20) as c:
        yield c


def torch_logits(model, inputs) -> np.ndarray:
    """Per-position logits [n, out] of a fresh state for token ids or frames."""
    with torch.no_grad():
        if isinstance(inputs, np.ndarray) and inputs.dtype == np.float32:
            x = torch.from_numpy(inputs)[None]
        else:
            x = torch.tensor([list(inputs)], dtype=torch.long)
        logits, _ = model(x, model.init_state(1))
    return logits[0].numpy()


def test_models(client):
    models = {m.name: m for m in client.models()}
    assert set(models) == {"lm-lstm", "lm-gru", "lm-rnn", "cls-lstm", "feat-gru"}
    lm, cls, feat = models["lm-lstm"], models["cls-lstm"], models["feat-gru"]
    assert (lm.kind, lm.cell, lm.input_kind, lm.input_dim, lm.output_size) == ("lm", "lstm", "tokens", 256, 256)
    assert cls.kind == "classifier" and cls.labels == ("class0", "class1", "class2", "class3")
    assert (feat.input_kind, feat.input_dim, feat.cell, feat.output_size) == ("features", 8, "gru", 10)
    assert lm.versions == (1,) and lm.state_bytes_per_session > 0
    assert client.model("feat-gru") == feat
    with pytest.raises(ModelNotFound):
        client.model("nope")


def test_step_outputs_match_pytorch(client, tiny_models):
    model = tiny_models[1]["lm-lstm"]
    with client.session("lm-lstm") as s:
        r = s.step("hello", logits=True, all_positions=True, argmax=True, top_k=3)
        expected = torch_logits(model, encode_text("hello"))
        assert r.position == s.position == 5 and r.steps == 5 and r.width == 256
        np.testing.assert_allclose(r.logits, expected, atol=ATOL)
        np.testing.assert_array_equal(r.argmax, expected.argmax(-1))
        assert r.top_k_ids.shape == r.top_k_logprobs.shape == (5, 3)
        np.testing.assert_array_equal(r.top_k_ids[:, 0], expected.argmax(-1))
        logprobs = torch.log_softmax(torch.from_numpy(expected), -1).numpy()
        np.testing.assert_allclose(r.top_k_logprobs, np.take_along_axis(logprobs, r.top_k_ids, 1), atol=ATOL)
        assert r.probs is None and r.sampled is None
        # The state carries over: one more token continues the same sequence.
        r2 = s.step([ord(" ")], logits=True)
        assert r2.logits.shape == (1, 256) and r2.position == 6
        np.testing.assert_allclose(r2.logits[0], torch_logits(model, encode_text("hello "))[-1], atol=ATOL)


def test_default_output_probs_and_sampling(client):
    with client.session("lm-gru") as s:
        r = s.step(b"ab")
        assert r.top_k_ids.shape == (1, 5) and r.logits is None and r.token == int(r.top_k_ids[0, 0])
        p = s.step("c", probs=True).probs
        assert p.shape == (1, 256) and abs(float(p.sum()) - 1) < 1e-4
    draws = []
    for _ in range(2):
        with client.session("lm-gru") as s:
            draws.append(s.step("abc", sample=Sampling(temperature=1.0, seed=11)).sampled.tolist())
    assert draws[0] == draws[1] and len(draws[0]) == 1
    with client.session("lm-gru") as s:
        r = s.step("abc", Output(argmax=True))
        assert r.argmax.shape == (1,) and r.token == int(r.argmax[0]) and r.top_k_ids is None
        with pytest.raises(ValueError, match="not both"):
            s.step("d", Output(argmax=True), logits=True)
        assert s.position == 3


def test_feed_returns_last_or_nothing_and_splits_long_prompts(server, flavour, tiny_models):
    model = tiny_models[1]["lm-rnn"]
    text = "a longer prompt, split in pieces"
    expected = torch_logits(model, encode_text(text))[-1]
    with flavour.client(server.target, config=ClientConfig(max_step_tokens=4)) as small:
        with small.session("lm-rnn") as s:
            assert s.feed(text, none=True) is None
            assert s.position == len(text)
        with small.session("lm-rnn") as s:
            r = s.feed(text, logits=True)
            assert r.steps == 1 and r.position == len(text)
            np.testing.assert_allclose(r.logits[0], expected, atol=ATOL)
        with small.session("lm-rnn") as s, pytest.raises(ValueError):
            s.feed(text, Output(all_positions=True))


def test_generate_is_reproducible_and_streams_text(client):
    runs = []
    for _ in range(2):
        with client.session("lm-lstm") as s:
            gen = s.generate("The ", max_tokens=24, temperature=1.0, top_k=40, seed=7)
            pieces = list(gen)
            assert gen.finish_reason == "length" and len(gen.tokens) == 24
            assert "".join(pieces) == gen.text == decode_tokens(gen.tokens)
            assert s.position == 4 + 24
            runs.append(gen.tokens)
    assert runs[0] == runs[1]
    with client.session("lm-lstm") as s:
        chunks = list(s.generate_tokens("The ", max_tokens=24, top_k=40, seed=7))
        assert [int(t) for c in chunks for t in c.tokens] == runs[0]
        assert [c.finish_reason for c in chunks][-1] == "length" and all(c.finish_reason is None for c in chunks[:-1])
        assert chunks[-1].position == s.position == 28
        assert all(a.position < b.position for a, b in zip(chunks, chunks[1:]))


def test_generate_stops_on_stop_sequence(client):
    with client.session("lm-gru") as s:
        greedy = s.generate("xyz", max_tokens=12, temperature=0.0)
        list(greedy)
        tokens = greedy.tokens
    stop_at = tokens.index(tokens[3])
    with client.session("lm-gru") as s:
        gen = s.generate("xyz", max_tokens=12, temperature=0.0, stop=bytes([tokens[3]]))
        list(gen)
        assert gen.finish_reason == "stop"
        assert gen.tokens == tokens[: stop_at + 1]
        assert s.position == 3 + stop_at + 1


def test_generate_without_prompt_and_early_break(client):
    with client.session("lm-lstm") as s:
        s.feed("Once", none=True)
        for _piece in s.generate(max_tokens=400, temperature=0.8, seed=3):
            break  # abandon: the call is cancelled; the server may have gone further
        r = s.step("x")  # the SDK re-reads the position first
        assert r.position == s.position == s.info().position


def test_classify_tokens_and_features(client, tiny_models):
    with client.session("cls-lstm") as s:
        c = s.classify("is this spam?")
        probs = torch.softmax(
            torch.from_numpy(torch_logits(tiny_models[1]["cls-lstm"], encode_text("is this spam?"))[-1]), -1
        )
        np.testing.assert_allclose(c.probs, probs.numpy(), atol=ATOL)
        assert c.label == f"class{int(probs.argmax())}" and c.class_id == int(probs.argmax())
        assert c.labels == ("class0", "class1", "class2", "class3") and c.position == len("is this spam?")
        assert c.ranked()[0] == (c.label, pytest.approx(c.confidence))
    frames = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    with client.session("feat-gru") as s:
        first = s.classify(frames[:4])
        c = s.classify(frames[4:])  # streaming: state carries over between calls
        expected = torch.softmax(torch.from_numpy(torch_logits(tiny_models[1]["feat-gru"], frames)), -1).numpy()
        np.testing.assert_allclose(first.probs, expected[3], atol=ATOL)
        np.testing.assert_allclose(c.probs, expected[-1], atol=ATOL)
        assert c.position == 6 and len(c.labels) == 10
        r = s.step(frames[0], logits=True)  # one frame [dim] is one step
        assert r.position == 7


def test_reset_info_attach_get_close(server, flavour, client):
    with client.session("lm-gru", session_id="sdk-test-session") as s:
        assert s.id == "sdk-test-session" and s.model == "lm-gru" and s.version == 1
        fresh = s.step("hey", logits=True).logits
        info = s.info()
        assert info.position == 3 and info.model == "lm-gru" and info.created_unix_ms <= info.last_used_unix_ms
        assert client.get_session(s.id) == s.info()
        with flavour.client(server.target) as other:
            attached = other.attach(s.id)
            assert attached.position == 3
            attached.step("!")
        with pytest.raises(PositionMismatch):
            s.step("x")  # the other client moved the session on
        s.info()
        assert s.position == 4
        assert s.reset().position == 0 and s.position == 0
        np.testing.assert_allclose(s.step("hey", logits=True).logits, fresh, atol=1e-6)
        assert s.close() == 3 and s.closed
        assert s.close() == 3  # idempotent
    with pytest.raises(SessionNotFound):
        client.get_session("sdk-test-session")
    s = client.session("lm-rnn")
    s.step("ab")
    assert client.close_session(s.id) == 2


def test_session_context_closes_on_error(client):
    with pytest.raises(RuntimeError, match="boom"):
        with client.session("lm-rnn") as s:
            sid = s.id
            raise RuntimeError("boom")
    with pytest.raises(SessionNotFound):
        client.get_session(sid)
    # attach() leaves the session open on exit unless asked
    s = client.session("lm-rnn")
    with client.attach(s.id):
        pass
    assert client.get_session(s.id).session_id == s.id
    with client.attach(s.id, close_on_exit=True):
        pass
    with pytest.raises(SessionNotFound):
        client.get_session(s.id)


def test_bearer_token_deadlines_and_options(server, flavour, tiny_models):
    config = ClientConfig(token="s3cret", timeout=5.0, max_message_bytes=8 << 20)
    assert config.metadata() == (("authorization", "Bearer s3cret"),)
    options = dict(config.channel_options())
    assert options["grpc.max_receive_message_length"] == 8 << 20 and options["grpc.keepalive_time_ms"] > 0
    with flavour.client(server.target, config=config) as c:
        assert c.models()  # the header travels on every call
    # a per-call deadline cuts a generation short: one that cannot finish first (in-process server
    # allowing a million tokens), so the deadline is what ends it, however fast the machine is
    from seqserve.server.api.app import ServerThread
    from seqserve.server.config import ServerConfig

    endless = 1_000_000
    with ServerThread(
        ServerConfig(models=str(tiny_models[0]), port=0, metrics_port=0, max_generate_tokens=endless)
    ) as srv:
        with flavour.client(srv.address, config=config) as c, c.session("lm-lstm") as s:
            with pytest.raises(DeadlineExceeded) as info:
                list(s.generate("x", max_tokens=endless, timeout=0.5))
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert s.step("y").position == s.info().position  # position re-read after the cut-short call
            assert not srv.call(lambda: srv.engine.get_session(s.id).generating)


def test_tls_options(server, flavour, tmp_path):
    with pytest.raises(ValueError, match="both"):
        TlsConfig(certificate_chain=b"-----BEGIN CERTIFICATE-----").credentials()
    with pytest.raises(ValueError, match="cannot read"):
        flavour.client(server.target, tls=TlsConfig(root_certificates=tmp_path / "missing.pem"))
    # A TLS client cannot talk to a plaintext server: the handshake fails, reported as Unavailable.
    with flavour.client(server.target, tls=True, max_retries=0, timeout=10) as c, pytest.raises(Unavailable):
        c.models()


def test_chunk_stream_and_generation_objects(client):
    with client.session("lm-gru") as s:
        chunks = s.generate_tokens("ab", max_tokens=6, temperature=0.0)
        assert chunks.finish_reason is None and chunks.tokens == []
        got = [c for c in chunks]
        assert [int(t) for c in got for t in c.tokens] == chunks.tokens and len(chunks.tokens) == 6
        assert chunks.finish_reason == "length" and got[-1].position == s.position == 8
        assert list(chunks) == []  # exhausted
        # Closing midway cancels the call; the session re-reads its position before its next call.
        gen = s.generate(max_tokens=500, seed=2)
        first = next(gen)
        assert isinstance(first, str) and gen.text == first and gen.finish_reason is None
        gen.close()
        assert list(gen) == []
        r = s.step("z")
        assert r.position == s.position == s.info().position
        stream = s.generate_tokens(max_tokens=500, seed=2)
        next(stream)
        stream.close()
        assert s.step("y").position == s.info().position


def test_session_properties_and_closed_objects(server, flavour):
    c = flavour.client(server.target, timeout=20)
    with c:
        s = c.session("lm-rnn", session_id="sdk-props")
        assert (s.id, s.model, s.version, s.position, s.closed) == ("sdk-props", "lm-rnn", 1, 0, False)
        assert s.last_info.session_id == "sdk-props" and s.last_info.position == 0
        s.step("abc")
        assert s.last_info.position == 0 and s.info() == s.last_info and s.last_info.position == 3
        assert "sdk-props" in repr(s) and "position=3" in repr(s)
        assert s.close() == 3 and s.closed and "closed" in repr(s)
        for call in (
            lambda: s.step("x"),
            lambda: s.feed("x"),
            lambda: s.reset(),
            lambda: s.classify("x"),
            lambda: s.generate("x"),
            lambda: s.generate_tokens("x"),
        ):
            with pytest.raises(ValueError, match="closed"):
                call()
    # A closed client stays closed.
    with pytest.raises(ValueError, match="client is closed"):
        c.models()
    with pytest.raises(ValueError, match="client is closed"):
        c.session("lm-rnn")

"""gRPC failures map to the SDK's exception hierarchy, checked on status codes and against a live server."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from seqserve.client import (AlreadyExists, AsyncClient, Client, InvalidInput, ModelNotFound, NotFound, Overloaded,
                             PermissionDenied, PositionMismatch, SeqServeError, SessionExpired, SessionNotFound,
                             Unauthenticated, Unavailable)
from seqserve.client.errors import DeadlineExceeded, FailedPrecondition, error_from_status, status_code_from_int
from tests.client_support import ClosedPort, LiveServer, shared_server

SC = grpc.StatusCode


@pytest.mark.parametrize("code, message, subject, cls", [
    (SC.NOT_FOUND, "session 'abc' expired at 2026-01-01T00:00:00Z after 5 s idle", "session", SessionExpired),
    (SC.NOT_FOUND, "session 'abc' was evicted at ... to make room", "session", SessionExpired),
    (SC.NOT_FOUND, "session 'abc' was closed at ... by a CloseSession call", "session", SessionNotFound),
    (SC.NOT_FOUND, "no session 'abc'; create one first", "unknown", SessionNotFound),
    (SC.NOT_FOUND, "unknown model 'nope'", "model", ModelNotFound),
    (SC.NOT_FOUND, "model 'nope' is not served", "unknown", ModelNotFound),
    (SC.NOT_FOUND, "nothing here", "unknown", NotFound),
    (SC.INVALID_ARGUMENT, "token id 300 is outside the vocabulary", "session", InvalidInput),
    (SC.RESOURCE_EXHAUSTED, "too many sessions", "model", Overloaded),
    (SC.UNAUTHENTICATED, "missing bearer token", "unknown", Unauthenticated),
    (SC.PERMISSION_DENIED, "not yours", "unknown", PermissionDenied),
    (SC.UNAVAILABLE, "server shutting down", "unknown", Unavailable),
    (SC.ALREADY_EXISTS, "session 'x' already exists", "model", AlreadyExists),
    (SC.DEADLINE_EXCEEDED, "Deadline Exceeded", "unknown", DeadlineExceeded),
    (SC.FAILED_PRECONDITION, "generation needs at least one consumed token", "session", FailedPrecondition),
    (SC.INTERNAL, "boom", "unknown", SeqServeError),
])
def test_status_maps_to_exception_class(code, message, subject, cls):
    err = error_from_status(code, message, subject)
    assert type(err) is cls
    assert isinstance(err, SeqServeError)
    assert err.code == code and err.details == message and str(err) == message


@pytest.mark.parametrize("message, expected, actual", [
    ("expected_position 5 does not match: session 'a' is at position 7", 5, 7),
    ("position mismatch: expected position 3, actual position 9", 3, 9),
    ("session is at 12, expected_position 4", 4, 12),
    ("position mismatch: expected 4 but the session moved on", 4, None),
])
def test_position_mismatch_parses_positions(message, expected, actual):
    err = error_from_status(SC.FAILED_PRECONDITION, message, "session")
    assert isinstance(err, PositionMismatch) and isinstance(err, FailedPrecondition)
    assert (err.expected, err.actual) == (expected, actual)


def test_numeric_codes_from_stream_errors():
    assert status_code_from_int(5) == SC.NOT_FOUND
    assert status_code_from_int(9) == SC.FAILED_PRECONDITION
    assert status_code_from_int(999) == SC.UNKNOWN


# -- against a live server ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(request, tiny_models):
    return shared_server(request, tiny_models[0])


@pytest.fixture()
def client(server):
    with Client(server.target, timeout=20) as c:
        yield c


def _assert_raw_status(err: SeqServeError, code: grpc.StatusCode):
    assert err.code == code
    assert err.details
    assert isinstance(err.__cause__, grpc.RpcError)
    assert err.__cause__.code() == code


def test_unknown_model(client):
    with pytest.raises(ModelNotFound) as info:
        client.session("no-such-model")
    _assert_raw_status(info.value, SC.NOT_FOUND)
    assert "no-such-model" in info.value.details


def test_unknown_and_closed_session(client):
    with pytest.raises(SessionNotFound) as info:
        client.get_session("never-created")
    assert not isinstance(info.value, SessionExpired)
    _assert_raw_status(info.value, SC.NOT_FOUND)
    s = client.session("lm-gru")
    sid = s.id
    s.close()
    with pytest.raises(SessionNotFound):
        client.attach(sid).step("x")


def test_position_mismatch_carries_positions(client):
    with client.session("lm-lstm") as s:
        other = client.attach(s.id)
        s.step("abc")
        with pytest.raises(PositionMismatch) as info:
            other.step("d")  # still believes position 0
        _assert_raw_status(info.value, SC.FAILED_PRECONDITION)
        assert info.value.expected == 0 and info.value.actual == 3, info.value.details
        other.info()
        assert other.step("d").position == 4


def test_invalid_inputs(client):
    with client.session("lm-rnn") as s:
        with pytest.raises(InvalidInput) as info:
            s.step([1, 2, 300])
        _assert_raw_status(info.value, SC.INVALID_ARGUMENT)
        assert s.position == 0
    with client.session("feat-gru") as s:
        with pytest.raises(InvalidInput):
            s.step(np.zeros((2, 5), dtype=np.float32))  # frames are 8 wide
    with pytest.raises(AlreadyExists):
        with client.session("lm-rnn", session_id="dup-id"):
            client.session("lm-rnn", session_id="dup-id")


def test_unreachable_server_is_unavailable():
    """A refused connection fails the call (after the retry), long before its deadline."""
    with ClosedPort() as closed, Client(closed.target, max_retries=1, timeout=60) as c:
        started = time.monotonic()
        with pytest.raises(Unavailable) as info:
            c.models()
        assert time.monotonic() - started < 30  # not the 60 s deadline: nothing waited for the port
        assert isinstance(info.value.__cause__, grpc.RpcError)


async def _async_errors(target: str) -> None:
    async with AsyncClient(target, timeout=20) as c:
        with pytest.raises(ModelNotFound):
            await c.session("no-such-model")
        with pytest.raises(SessionNotFound):
            await c.get_session("never-created")
        async with c.session("lm-lstm") as s:
            with pytest.raises(InvalidInput):
                await s.step([999])


def test_async_errors_map_the_same(server):
    import asyncio

    asyncio.run(_async_errors(server.target))


@pytest.fixture(scope="module")
def strict_server(tiny_models):
    """A server which refuses a third session per model (no idle expiry to race with)."""
    server = LiveServer(tiny_models[0], "--max-sessions-per-model", "2", "--when-full", "refuse")
    yield server
    server.stop()


def test_full_server_is_overloaded(strict_server):
    with Client(strict_server.target, timeout=20) as c:
        with c.session("cls-lstm"), c.session("cls-lstm"):
            with pytest.raises(Overloaded) as info:
                c.session("cls-lstm")
            _assert_raw_status(info.value, SC.RESOURCE_EXHAUSTED)


def test_expired_session(tiny_models):
    """An in-process server whose session table runs on a clock the test advances: the session
    expires when that clock passes its 1 s TTL, whatever the wall time."""
    from seqserve.server.api.app import ServerThread
    from seqserve.server.config import ServerConfig

    class Clock:
        now = 1_000_000.0

        def __call__(self) -> float:
            return self.now

    clock = Clock()
    with ServerThread(ServerConfig(models=str(tiny_models[0]), port=0, idle_ttl_s=1.0)) as srv:
        srv.call(lambda: setattr(srv.engine.table, "clock", clock))
        with Client(srv.address, timeout=20) as c:
            s = c.session("lm-rnn")
            s.step("a")
            clock.now += 0.5
            assert c.get_session(s.id).position == 1  # within the TTL
            clock.now += 1.0
            deadline = time.monotonic() + 15  # the server's sweeper runs every 0.25 s
            while srv.call(lambda: s.id in srv.engine.table.sessions):
                assert time.monotonic() < deadline, "session never expired"
                time.sleep(0.02)
            with pytest.raises(SessionExpired) as info:
                c.get_session(s.id)
            assert "expired" in info.value.details and info.value.code == SC.NOT_FOUND
            with pytest.raises(SessionExpired):
                s.step("b")
            s.close()  # closing a session the server dropped is not an error
            assert s.closed

"""gRPC failures map to the SDK's exceptions by the server's reason (status code only without one),
checked on built statuses and against a live server in both flavours."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from seqserve.client import (
    AlreadyExists,
    InvalidInput,
    ModelNotFound,
    NotFound,
    Overloaded,
    PermissionDenied,
    PositionMismatch,
    SeqServeError,
    SessionExpired,
    SessionNotFound,
    Unauthenticated,
    Unavailable,
)
from seqserve.client.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    error_from_status,
    error_from_step_error,
    rich_error_info,
    status_code_from_int,
)
from tests.client_support import FLAVOURS, ClosedPort, LiveServer, flavour_fixture, shared_server

SC = grpc.StatusCode


def _trailer(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    domain: str = "seqserve",
    status_code: int | None = None,
    **metadata: str,
) -> tuple[tuple[str, bytes], ...]:
    """The grpc-status-details-bin trailer a server sends, built with grpcio-status as the server does."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=metadata))
    status = status_pb2.Status(
        code=code.value[0] if status_code is None else status_code, message=message, details=[detail]
    )
    return tuple(rpc_status.to_status(status).trailing_metadata)


@pytest.mark.parametrize(
    "code, reason, cls",
    [
        (SC.NOT_FOUND, "SESSION_EXPIRED", SessionExpired),
        (SC.NOT_FOUND, "SESSION_EVICTED", SessionExpired),
        (SC.NOT_FOUND, "SESSION_CLOSED", SessionNotFound),
        (SC.NOT_FOUND, "SESSION_NOT_FOUND", SessionNotFound),
        (SC.NOT_FOUND, "MODEL_NOT_FOUND", ModelNotFound),
        (SC.NOT_FOUND, "SOMETHING_NEW", NotFound),
        (SC.INVALID_ARGUMENT, "TOKEN_OUT_OF_RANGE", InvalidInput),
        (SC.RESOURCE_EXHAUSTED, "SESSION_LIMIT", Overloaded),
        (SC.ALREADY_EXISTS, "SESSION_EXISTS", AlreadyExists),
        (SC.FAILED_PRECONDITION, "SESSION_GENERATING", FailedPrecondition),
        (SC.FAILED_PRECONDITION, "POSITION_MISMATCH", PositionMismatch),
        (SC.UNAVAILABLE, "SHUTTING_DOWN", Unavailable),
        (SC.INTERNAL, "RUN_FAILED", SeqServeError),
    ],
)
def test_reason_picks_the_class(code, reason, cls):
    # The message says nothing the SDK could match: only the reason decides.
    err = error_from_status(code, "words for people", reason, {"k": "v"})
    assert type(err) is cls
    assert (err.code, err.details, err.reason, err.metadata) == (code, "words for people", reason, {"k": "v"})


@pytest.mark.parametrize(
    "code, cls",
    [
        (SC.NOT_FOUND, NotFound),
        (SC.FAILED_PRECONDITION, FailedPrecondition),
        (SC.INVALID_ARGUMENT, InvalidInput),
        (SC.OUT_OF_RANGE, InvalidInput),
        (SC.RESOURCE_EXHAUSTED, Overloaded),
        (SC.UNAUTHENTICATED, Unauthenticated),
        (SC.PERMISSION_DENIED, PermissionDenied),
        (SC.UNAVAILABLE, Unavailable),
        (SC.ALREADY_EXISTS, AlreadyExists),
        (SC.DEADLINE_EXCEEDED, DeadlineExceeded),
        (SC.INTERNAL, SeqServeError),
    ],
)
def test_without_a_reason_only_the_code_counts(code, cls):
    # Messages that the old SDK read meaning into change nothing now.
    for message in (
        "session 'abc' expired after 5 s idle",
        "unknown model 'x'",
        "expected position 3 but session 'a' is at position 9",
    ):
        err = error_from_status(code, message)
        assert type(err) is cls and err.reason is None and err.metadata == {}
        assert err.details == str(err) == message


def test_position_mismatch_reads_its_metadata():
    err = error_from_status(
        SC.FAILED_PRECONDITION, "moved on", "POSITION_MISMATCH", {"expected": "5", "actual": "7", "applied": "6"}
    )
    assert isinstance(err, PositionMismatch) and isinstance(err, FailedPrecondition)
    assert (err.expected, err.actual, err.metadata["applied"]) == (5, 7, "6")
    bare = error_from_status(SC.FAILED_PRECONDITION, "moved on", "POSITION_MISMATCH", {"expected": "x"})
    assert (bare.expected, bare.actual) == (None, None)


def test_rich_status_trailer_is_parsed():
    trailer = _trailer(SC.NOT_FOUND, "gone", "SESSION_EVICTED", session_id="abc")
    info = rich_error_info(SC.NOT_FOUND, trailer)
    assert info is not None and (info.reason, dict(info.metadata)) == ("SESSION_EVICTED", {"session_id": "abc"})
    # Other domains' reasons, a status for another code, and garbage are not trusted.
    assert rich_error_info(SC.NOT_FOUND, _trailer(SC.NOT_FOUND, "gone", "SESSION_EVICTED", domain="proxy")) is None
    assert rich_error_info(SC.NOT_FOUND, _trailer(SC.NOT_FOUND, "gone", "SESSION_EVICTED", status_code=9)) is None
    assert rich_error_info(SC.NOT_FOUND, (("grpc-status-details-bin", b"\xff\x00garbage"),)) is None
    assert rich_error_info(SC.NOT_FOUND, None) is None and rich_error_info(SC.NOT_FOUND, ()) is None


def test_stream_step_errors_map_by_reason():
    err = error_from_step_error(9, "moved on", "POSITION_MISMATCH", {"expected": "1", "actual": "2"})
    assert isinstance(err, PositionMismatch) and (err.expected, err.actual) == (1, 2)
    plain = error_from_step_error(5, "session 'a' expired", "", {})
    assert type(plain) is NotFound and plain.reason is None


def test_numeric_codes_from_stream_errors():
    assert status_code_from_int(5) == SC.NOT_FOUND
    assert status_code_from_int(9) == SC.FAILED_PRECONDITION
    assert status_code_from_int(999) == SC.UNKNOWN


# -- against a live server ----------------------------------------------------------------------


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


def _assert_raw_status(err: SeqServeError, code: grpc.StatusCode):
    assert err.code == code
    assert err.details
    assert isinstance(err.__cause__, grpc.RpcError)
    assert err.__cause__.code() == code


def test_unknown_model(client):
    with pytest.raises(ModelNotFound) as info:
        client.session("no-such-model")
    _assert_raw_status(info.value, SC.NOT_FOUND)
    assert info.value.reason == "MODEL_NOT_FOUND" and "no-such-model" in info.value.details


def test_unknown_and_closed_session(client):
    with pytest.raises(SessionNotFound) as info:
        client.get_session("never-created")
    assert not isinstance(info.value, SessionExpired) and info.value.reason == "SESSION_NOT_FOUND"
    _assert_raw_status(info.value, SC.NOT_FOUND)
    s = client.session("lm-gru")
    sid = s.id
    attached = client.attach(sid)
    s.close()
    with pytest.raises(SessionNotFound) as info:
        attached.step("x")
    assert info.value.reason == "SESSION_CLOSED" and info.value.metadata.get("session_id") == sid


def test_position_mismatch_carries_positions(client):
    with client.session("lm-lstm") as s:
        other = client.attach(s.id)
        s.step("abc")
        with pytest.raises(PositionMismatch) as info:
            other.step("d")  # still believes position 0
        _assert_raw_status(info.value, SC.FAILED_PRECONDITION)
        assert info.value.reason == "POSITION_MISMATCH"
        assert info.value.expected == 0 and info.value.actual == 3, info.value.metadata
        other.info()
        assert other.step("d").position == 4


def test_invalid_inputs(client):
    with client.session("lm-rnn") as s:
        with pytest.raises(InvalidInput) as info:
            s.step([1, 2, 300])
        _assert_raw_status(info.value, SC.INVALID_ARGUMENT)
        assert info.value.reason == "TOKEN_OUT_OF_RANGE" and s.position == 0
    with client.session("feat-gru") as s:
        with pytest.raises(InvalidInput):
            s.step(np.zeros((2, 5), dtype=np.float32))  # frames are 8 wide
    with pytest.raises(AlreadyExists) as info:
        with client.session("lm-rnn", session_id="dup-id"):
            client.session("lm-rnn", session_id="dup-id")
    assert info.value.reason == "SESSION_EXISTS"


def test_unreachable_server_is_unavailable(flavour):
    """A refused connection fails the call (after the retry), long before its deadline."""
    with ClosedPort() as closed, flavour.client(closed.target, max_retries=1, timeout=60) as c:
        started = time.monotonic()
        with pytest.raises(Unavailable) as info:
            c.models()
        assert time.monotonic() - started < 30  # not the 60 s deadline: nothing waited for the port
        assert isinstance(info.value.__cause__, grpc.RpcError)
        assert info.value.reason is None and info.value.metadata == {}  # a transport failure: no ErrorInfo


@pytest.fixture(scope="module")
def strict_server(tiny_models):
    """A server which refuses a third session per model (no idle expiry to race with)."""
    server = LiveServer(tiny_models[0], "--max-sessions-per-model", "2", "--when-full", "refuse")
    yield server
    server.stop()


def test_full_server_is_overloaded(strict_server, flavour):
    with flavour.client(strict_server.target, timeout=20) as c:
        with c.session("cls-lstm"), c.session("cls-lstm"):
            with pytest.raises(Overloaded) as info:
                c.session("cls-lstm")
            _assert_raw_status(info.value, SC.RESOURCE_EXHAUSTED)
            assert info.value.reason == "SESSION_LIMIT"


def test_expired_session(tiny_models, flavour):
    """An in-process server whose session table runs on a clock the test advances: the session
    expires when that clock passes its 1 s TTL, whatever the wall time."""
    from seqserve.server.api.app import ServerThread
    from seqserve.server.config import ServerConfig

    class Clock:
        now = 1_000_000.0

        def __call__(self) -> float:
            return self.now

    clock = Clock()
    with ServerThread(ServerConfig(models=str(tiny_models[0]), port=0, metrics_port=0, idle_ttl_s=1.0)) as srv:
        srv.call(lambda: setattr(srv.engine.table, "clock", clock))
        with flavour.client(srv.address, timeout=20) as c:
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
            assert info.value.reason == "SESSION_EXPIRED" and info.value.code == SC.NOT_FOUND
            with pytest.raises(SessionExpired):
                s.step("b")
            s.close()  # closing a session the server dropped is not an error
            assert s.closed

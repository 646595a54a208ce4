"""Every error the server can raise has a stable reason, documented, and sent as ErrorInfo."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from seqserve.server.api.status import DOMAIN, error_message, rich_status
from seqserve.server.errors import Code, Reason, ServeError, precondition

ROOT = Path(__file__).resolve().parents[1]


def documented_reasons() -> dict[str, str]:
    text = (ROOT / "docs" / "server.md").read_text()
    table = text.split("<!-- reasons-table:start -->")[1].split("<!-- reasons-table:end -->")[0]
    return dict(re.findall(r"^\| `([A-Z_]+)` \| ([A-Z_]+) \|", table, re.M))


def test_the_docs_table_lists_every_reason_with_its_status():
    documented = documented_reasons()
    assert set(documented) == {r.value for r in Reason}, "docs/server.md's reasons table and Reason differ"
    assert set(documented.values()) <= {c.name for c in Code}


def test_every_reason_is_raised_somewhere_in_the_server():
    """No reason in the table that nothing raises (and the status in the table is the one used)."""
    source = "\n".join(p.read_text() for p in (ROOT / "server").rglob("*.py") if p.name != "errors.py")
    documented = documented_reasons()
    for reason in Reason:
        assert f"Reason.{reason.name}" in source or reason in (Reason.SHUTTING_DOWN, Reason.RUN_FAILED), reason
    helpers = {"SHUTTING_DOWN": "UNAVAILABLE", "RUN_FAILED": "INTERNAL"}
    for name, status in helpers.items():
        assert documented[name] == status


@pytest.mark.parametrize("reason", list(Reason))
def test_the_rich_status_carries_the_reason_and_metadata(reason):
    err = ServeError(Code[documented_reasons()[reason.value]], reason, "a message", expected=3, actual=5)
    status = rich_status(err)
    assert status.code == getattr(grpc.StatusCode, err.code.name) and status.details == "a message"
    ((key, value),) = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    detail = rpc_status.status_pb2.Status.FromString(value)
    assert detail.code == err.code.value and detail.message == "a message"
    info = error_details_pb2.ErrorInfo()
    assert detail.details[0].Unpack(info)
    assert (info.domain, info.reason, dict(info.metadata)) == (DOMAIN, reason.value, {"expected": "3", "actual": "5"})


def test_a_stream_error_carries_the_same_reason():
    err = precondition(Reason.POSITION_MISMATCH, "expected position 3 but ...", expected=3, actual=5)
    msg = error_message(err)
    assert (msg.code, msg.reason, dict(msg.metadata)) == (9, "POSITION_MISMATCH", {"expected": "3", "actual": "5"})


def test_a_real_call_and_a_real_stream_carry_the_reason(tiny_models):
    """Through a real server on loopback: a unary refusal's trailer and a stream step's error."""
    from seqserve.server.api.app import ServerThread
    from seqserve.server.config import ServerConfig
    from seqserve.v1 import seqserve_pb2 as pb
    from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

    models_dir, _ = tiny_models
    with (
        ServerThread(ServerConfig(models=str(models_dir), port=0, metrics_port=0)) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.SeqServeStub(channel)
        sid = stub.CreateSession(pb.CreateSessionRequest(model="lm-lstm")).session_id
        stub.Step(pb.StepRequest(session_id=sid, tokens=[1, 2]))
        with pytest.raises(grpc.RpcError) as refused:
            stub.Step(pb.StepRequest(session_id=sid, tokens=[3], expected_position=7))
        status = rpc_status.from_call(refused.value)
        info = error_details_pb2.ErrorInfo()
        assert status is not None and status.details[0].Unpack(info)
        assert (info.reason, info.metadata["expected"], info.metadata["actual"]) == ("POSITION_MISMATCH", "7", "2")
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
        results = list(stub.StepStream(iter([pb.StepRequest(session_id=sid, tokens=[1], tag=4)])))
        assert [(r.tag, r.error.reason, r.error.metadata["session_id"]) for r in results] == [
            (4, "SESSION_CLOSED", sid)
        ]

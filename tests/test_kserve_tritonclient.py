"""The KServe v2 / Triton endpoint as Triton's own client sees it: tritonclient.grpc, installed in
this environment (pyproject's dev extras), drives a real server on loopback; its answers must equal
the native API's for the same steps.

tritonclient runs in a child process (tests/tritonclient_checks.py): it and seqserve's server each
register protobuf messages named ``inference.*``, and protobuf holds one definition per name per
process. The server runs here, so the native references come from the same engine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

# Never import tritonclient here (not even to skip without it): it would make the server's messages
# unimportable for the rest of the run. It is a dev dependency, so it is there.
HERE = Path(__file__).resolve().parent
STEPS = [[72, 105], [33], [10, 20, 30], [7]]
STREAM = {"7": [[1], [2, 3], [4]], "8": [[200], [201]], "9": [[9], [9], [9], [9]]}
PLAN = {
    "model": "lm-lstm",
    "int_id": 42,
    "string_id": "user-17/chat",
    "steps": STEPS,
    "stream": STREAM,
    "orphan_id": 77,
}


def native_logits(stub, pb, steps: list[list[int]]) -> list[np.ndarray]:
    """Every position's logits for ``steps`` on a fresh native session."""
    sid = stub.CreateSession(pb.CreateSessionRequest(model="lm-lstm")).session_id
    out = []
    for tokens in steps:
        res = stub.Step(
            pb.StepRequest(session_id=sid, tokens=tokens, output=pb.OutputSpec(logits=True, all_positions=True))
        )
        out.append(np.frombuffer(res.logits, "<f4").reshape(1, len(tokens), res.width))
    stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
    return out


@pytest.fixture(scope="module")
def seen(tiny_models):
    """What tritonclient saw, the native references, and the server's open sessions afterwards."""
    from seqserve.server.api.app import ServerThread
    from seqserve.server.config import ServerConfig
    from seqserve.v1 import seqserve_pb2 as pb
    from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

    models_dir, _ = tiny_models
    with ServerThread(ServerConfig(models=str(models_dir), port=0, metrics_port=0, device="cpu")) as server:
        proc = subprocess.run(
            [sys.executable, str(HERE / "tritonclient_checks.py"), server.address, json.dumps(PLAN)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.SeqServeStub(channel)
            native = {
                "steps": native_logits(stub, pb, STEPS),
                "stream": {sid: native_logits(stub, pb, steps) for sid, steps in STREAM.items()},
            }
        open_sessions = server.call(lambda: len(server.engine.table.sessions))
    return json.loads(proc.stdout), native, open_sessions


def test_health_and_metadata(seen):
    got, _, _ = seen
    assert got["live"] and got["ready"] and got["model_ready"] and not got["unknown_model_ready"]
    assert {"sequence", "sequence(string_id)"} <= set(got["server_metadata"]["extensions"])
    meta = got["metadata"]
    assert meta["name"] == "lm-lstm" and meta["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [("tokens", "INT64", ["-1", "-1"])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [
        ("logits", "FP32", ["-1", "-1", "256"])
    ]


def test_model_config_marks_the_model_stateful(seen):
    config = seen[0]["config"]["config"]
    assert "sequence_batching" in config  # how perf_analyzer and other tools tell a stateful model
    assert int(config["max_batch_size"]) >= 1
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [("tokens", "TYPE_INT64", ["-1"])]
    assert [(o["name"], o["data_type"], o["dims"]) for o in config["output"]] == [
        ("logits", "TYPE_FP32", ["-1", "256"])
    ]


@pytest.mark.parametrize("kind", ["int_id", "string_id"])
def test_infer_steps_a_sequence_to_the_native_logits(seen, kind):
    got, native, _ = seen
    assert len(got[kind]) == len(STEPS)
    for mine, want in zip(got[kind], native["steps"]):
        np.testing.assert_allclose(np.array(mine, np.float32), want, rtol=0, atol=1e-6)


def test_a_stream_interleaves_sequences_and_survives_an_error(seen):
    got, native, _ = seen
    expected = {f"{sid}/{r}": native["stream"][sid][r] for sid, steps in STREAM.items() for r in range(len(steps))}
    assert set(got["stream"]) == set(expected) | {"after-error"}
    for rid, want in expected.items():
        np.testing.assert_allclose(np.array(got["stream"][rid], np.float32), want, rtol=0, atol=1e-6)
    [error] = got["stream_errors"]
    assert "sequence 77" in error and "must specify the START flag" in error


def test_refusals_carry_tritons_codes_and_words(seen):
    got = seen[0]
    assert got["missing_start"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "must specify the START flag on the first request of the sequence" in got["missing_start"]["message"]
    assert got["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert "no-such-model" in got["unknown_model"]["message"]
    assert got["wrong_datatype"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "data-type is 'INT32', but model 'lm-lstm' expects 'INT64'" in got["wrong_datatype"]["message"]
    assert got["wrong_shape"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "batch-size 1" in got["wrong_shape"]["message"]
    assert got["no_sequence_id"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "non-zero or non-empty correlation ID" in got["no_sequence_id"]["message"]


def test_ended_sequences_leave_no_session_and_statistics_count_them(seen):
    got, _, open_sessions = seen
    assert open_sessions == 0  # every sequence sent sequence_end; the native references were closed
    [stats] = got["statistics"]["model_stats"]
    steps = 2 * len(STEPS) + sum(len(s) for s in STREAM.values()) + 1
    assert int(stats["inference_stats"]["success"]["count"]) == steps
    assert int(stats["inference_stats"]["fail"]["count"]) >= 5


def test_every_message_and_rpc_matches_tritonclients_copy_of_the_protocol():
    """Our proto, written from the protocol description, against the one Triton's client ships:
    every message, field (number, type, cardinality, type name) and RPC of ours is theirs."""
    from seqserve.kserve import grpc_service_pb2, model_config_pb2
    from tests.tritonclient_checks import wire_shape

    proc = subprocess.run(
        [sys.executable, str(HERE / "tritonclient_checks.py"), "wire"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout)
    ours = json.loads(json.dumps(wire_shape([grpc_service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR])))
    assert len(ours) > 40
    for name, fields in ours.items():
        assert name in theirs, f"{name} is not in Triton's protocol"
        for field, shape in fields.items():
            assert theirs[name].get(field) == shape, (name, field, shape, theirs[name].get(field))


def test_the_docs_example_runs(tiny_models):
    """docs/triton-compat.md's example, as written, against a live server (in its own process)."""
    import re

    from seqserve.server.api.app import ServerThread
    from seqserve.server.config import ServerConfig

    text = (HERE.parent / "docs" / "triton-compat.md").read_text()
    [example] = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    models_dir, _ = tiny_models
    with ServerThread(ServerConfig(models=str(models_dir), port=0, metrics_port=0, device="cpu")) as server:
        code = example.replace("127.0.0.1:50051", server.address)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        open_sessions = server.call(lambda: len(server.engine.table.sessions))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("(1, 5, 256) (1, 7, 256) ")
    assert open_sessions == 0

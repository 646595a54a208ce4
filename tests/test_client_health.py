"""`seqserve health`, the container health probe: exit 0 only when the gRPC health service says SERVING."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from seqserve.client.health import check
from tests.client_support import ROOT, ClosedPort, shared_server

pytestmark = pytest.mark.timeout(120)


def probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")}
    return subprocess.run(
        [sys.executable, "-m", "seqserve", "health", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**base, **(env or {})},
    )


@pytest.fixture(scope="module")
def server(request, tiny_models):
    return shared_server(request, tiny_models[0])


@pytest.fixture()
def health_only():
    """A gRPC server with only the reference health service (grpcio-health-checking), whose
    statuses the test sets: the states a real seqserve passes through too briefly to catch."""
    servicer = health.HealthServicer()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield servicer, f"127.0.0.1:{port}"
    grpc_server.stop(None)


def test_serving_server_exits_zero(server):
    proc = probe("--address", server.target)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{server.target}: SERVING"


def test_named_service_and_unknown_service(server):
    assert probe("--address", server.target, "--service", "seqserve.v1.SeqServe").returncode == 0
    proc = probe("--address", server.target, "--service", "no.such.Service")
    assert proc.returncode == 1
    assert "NOT_FOUND" in proc.stderr


def test_default_address_is_the_port_in_seqserve_port(server):
    """In the image the probe runs with the server's environment, so it finds the port there."""
    proc = probe(env={"SEQSERVE_PORT": str(server.port)})
    assert proc.returncode == 0, proc.stderr
    assert f"127.0.0.1:{server.port}: SERVING" in proc.stdout


def test_unreachable_server_exits_one_never_two():
    """Docker reserves exit code 2 in health checks; every failed probe is 1."""
    with ClosedPort() as closed:
        proc = probe("--address", closed.target, "--timeout", "5")
    assert proc.returncode == 1
    assert "UNAVAILABLE" in proc.stderr


@pytest.mark.parametrize(
    "status, expected",
    [
        (health_pb2.HealthCheckResponse.NOT_SERVING, "NOT_SERVING"),
        (health_pb2.HealthCheckResponse.UNKNOWN, "UNKNOWN"),
        (health_pb2.HealthCheckResponse.SERVING, "SERVING"),
    ],
)
def test_every_status_is_decoded(health_only, status, expected):
    servicer, address = health_only
    servicer.set("svc", status)
    result = check(address, "svc", timeout=5)
    assert result.status == expected
    assert result.serving == (expected == "SERVING")


def test_quiet_prints_nothing(health_only):
    servicer, address = health_only
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    proc = probe("--address", address, "--quiet")
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", "")


def test_probe_needs_neither_the_server_nor_grpc_health(server):
    """The probe is part of the client install: it works with grpcio-health-checking unimportable."""
    code = textwrap.dedent("""
        import importlib.abc, sys

        BLOCKED = ("grpc_health", "seqserve.server", "onnxruntime", "torch")

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                    raise ImportError(f"blocked for this test: {name}")
                return None

        sys.meta_path.insert(0, Block())
        import seqserve.cli
        raise SystemExit(seqserve.cli.main(["health", "--address", sys.argv[1]]))
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code, server.target], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert "SERVING" in proc.stdout

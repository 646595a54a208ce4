"""Health that tells the truth, seen through the standard health client, in a server process
started as the container image starts it (its entry point and settings, read from the Dockerfile).

NOT_SERVING while the models load (the port is already open), SERVING once every model is ready,
NOT_SERVING from SIGTERM on while accepted work drains (the port still open), for the whole
server ("") and for each service name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from seqserve.server.config import ServerConfig
from seqserve.server.engine import Engine
from seqserve.server.errors import Reason, ServeError
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc
from tests import deploy_support as deploy
from tests.metrics_support import Samples, free_port, scrape_text

pytestmark = pytest.mark.timeout(120)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
NAMES = ("", "seqserve.v1.SeqServe", "inference.GRPCInferenceService")
VERSIONS = 200  # versions of one tiny model: loading them takes a few seconds, the window health is watched in


def many_versions(tiny_models, root: Path) -> Path:
    """A models folder with VERSIONS versions of the tiny GRU language model (one ONNX file)."""
    source = tiny_models[0] / "lm-gru" / "1"
    manifest = json.loads((source / "manifest.json").read_text())
    for version in range(1, VERSIONS + 1):
        folder = root / "lm-gru" / str(version)
        folder.mkdir(parents=True)
        (folder / "model.onnx").symlink_to(source / "model.onnx")
        (folder / "manifest.json").write_text(json.dumps({**manifest, "version": version}))
    return root


def container_start(models: Path, port: int, metrics_port: int) -> tuple[list[str], dict[str, str]]:
    """The server image's entry point and settings (from the Dockerfile), on loopback ports chosen
    by the test and with generations long enough to be in flight at SIGTERM."""
    argv, settings = deploy.server_launch(
        {
            "SEQSERVE_MODELS": str(models),
            "SEQSERVE_HOST": "127.0.0.1",
            "SEQSERVE_PORT": str(port),
            "SEQSERVE_METRICS_HOST": "127.0.0.1",
            "SEQSERVE_METRICS_PORT": str(metrics_port),
            "SEQSERVE_MAX_GENERATE_TOKENS": "1000000",
        }
    )
    assert argv[0] == "seqserve", argv
    launcher = Path(sys.executable).with_name("seqserve")  # the console script, as in the image's venv
    assert launcher.exists(), launcher
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")}
    return [str(launcher), *argv[1:]], {**env, **settings}


def statuses(health) -> dict[str, int]:
    return {name: health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status for name in NAMES}


def test_loading_serving_draining(tiny_models, tmp_path):
    models = many_versions(tiny_models, tmp_path / "models")
    port, metrics_port = free_port(), free_port()
    argv, env = container_start(models, port, metrics_port)
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
    # retry the connection every 50 ms, not after gRPC's default backoff (1 s, growing): the first
    # attempt usually comes before the port is open, and a backed-off retry could come after loading
    backoff = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 50)]
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=backoff)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        grpc.channel_ready_future(channel).result(timeout=60)  # the port opens before the models load
        seen = [statuses(health)]
        assert seen[0] == {name: NOT_SERVING for name in NAMES}, seen[0]
        deadline = time.monotonic() + 90
        while seen[-1] != {name: SERVING for name in NAMES}:
            assert proc.poll() is None and time.monotonic() < deadline, "".join(log)
            seen.append(statuses(health))
        assert sum("loaded model" in line for line in log) == VERSIONS  # SERVING only once every model is loaded
        assert Samples(scrape_text(metrics_port)).value("seqserve_serving") == 1

        # an endless generation keeps the server draining after SIGTERM, until the test ends it
        stub = pb_grpc.SeqServeStub(channel)
        sid = stub.CreateSession(pb.CreateSessionRequest(model="lm-gru")).session_id
        generation = stub.Generate(pb.GenerateRequest(session_id=sid, prompt=[1], max_tokens=1000000))
        next(generation)
        proc.send_signal(signal.SIGTERM)
        while statuses(health) != {name: NOT_SERVING for name in NAMES}:
            assert proc.poll() is None and time.monotonic() < deadline, "".join(log)
        assert Samples(scrape_text(metrics_port)).value("seqserve_serving") == 0
        with pytest.raises(grpc.RpcError) as refused:  # new work is refused while draining
            stub.CreateSession(pb.CreateSessionRequest(model="lm-gru"))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        generation.cancel()  # the last work in flight ends: the server finishes stopping
        assert proc.wait(timeout=60) == 0, "".join(log)
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_requests_before_the_models_are_loaded_are_told_to_retry(tiny_models):
    engine = Engine(ServerConfig(models=str(tiny_models[0])))  # not loaded yet
    with pytest.raises(ServeError) as info:
        engine.create_session("lm-gru")
    assert info.value.reason == Reason.STARTING and info.value.code.name == "UNAVAILABLE"
    engine.load()
    assert engine.create_session("lm-gru").position == 0


def test_reflection_lists_every_service_and_describes_it(tiny_models):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    from seqserve.server.api.app import ServerThread

    with ServerThread(ServerConfig(models=str(tiny_models[0]), port=0, metrics_port=0)) as srv:
        with grpc.insecure_channel(srv.address) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            services = set(database.get_services())
            assert {"seqserve.v1.SeqServe", "grpc.health.v1.Health"} <= services, services
            # a client that has no .proto files learns the methods and messages from the server
            pool = DescriptorPool(database)
            service = pool.FindServiceByName("seqserve.v1.SeqServe")
            methods = {m.name for m in service.methods}
            assert {"CreateSession", "Step", "StepStream", "Generate", "ListModels"} <= methods
            assert pool.FindMessageTypeByName("seqserve.v1.StepRequest").fields_by_name["session_id"]

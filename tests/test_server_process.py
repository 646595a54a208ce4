"""`seqserve serve` as a real process: startup lines, graceful SIGTERM, refusals, settings wiring."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(90)
GENERATION = 20_000  # tokens: ~1.5 s alone for the tiny model on one core


def start(args: list[str], env: dict | None = None) -> tuple[subprocess.Popen, int, list[str]]:
    """Start `seqserve serve ARGS`; return the process, its port and the log lines read so far."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")}
    full_env["SEQSERVE_METRICS_PORT"] = "0"  # several servers run at once here
    full_env.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "seqserve", "serve", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=full_env,
    )
    lines: list[str] = []
    for line in proc.stderr:
        lines.append(line)
        found = re.search(r"listening on [\d.]+:(\d+)", line)
        if found:
            threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
            return proc, int(found.group(1)), lines
    proc.wait(timeout=10)
    raise AssertionError("server did not start:\n" + "".join(lines))


def finish(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.kill()
    return proc.wait(timeout=10)


def test_sigterm_finishes_in_flight_work_and_exits_zero(tiny_models):
    models_dir, _ = tiny_models
    # a generation long enough to be in flight at SIGTERM on any machine, and time to finish it
    proc, port, lines = start(
        [
            "--models",
            str(models_dir),
            "--port",
            "0",
            "--max-generate-tokens",
            str(GENERATION),
            "--shutdown-grace-s",
            "60",
        ]
    )
    try:
        assert sum("loaded model" in line for line in lines) == 5
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.SeqServeStub(channel)
        sid = stub.CreateSession(pb.CreateSessionRequest(model="lm-lstm")).session_id
        gen_sid = stub.CreateSession(pb.CreateSessionRequest(model="lm-gru")).session_id
        sent, stop_sending = [], threading.Event()

        def requests():
            for i in range(100000):
                if stop_sending.is_set():
                    return
                sent.append(i)
                yield pb.StepRequest(session_id=sid, tokens=[i % 256], tag=i)
                time.sleep(0.002)

        results, outcome = [], {}

        def consume():
            try:
                for result in stub.StepStream(requests()):
                    results.append(result)
            except grpc.RpcError as exc:
                outcome["code"] = exc.code()
            stop_sending.set()

        reader = threading.Thread(target=consume)
        reader.start()
        deadline = time.monotonic() + 30
        while len(results) < 20:  # the stream is under way
            assert time.monotonic() < deadline and reader.is_alive(), f"only {len(results)} step results"
            time.sleep(0.01)
        generation = stub.Generate(
            pb.GenerateRequest(session_id=gen_sid, prompt=[1, 2], max_tokens=GENERATION, tokens_per_message=256)
        )
        first = next(generation)
        proc.send_signal(signal.SIGTERM)
        rest = list(generation)  # the generation in flight runs to its end
        reader.join(timeout=30)
        assert not reader.is_alive()
        assert proc.wait(timeout=30) == 0
        assert len(first.tokens) + sum(len(m.tokens) for m in rest) == GENERATION
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert outcome.get("code") == grpc.StatusCode.UNAVAILABLE  # the stream is ended, not dropped
        ok = [r for r in results if not r.HasField("error")]
        refused = [r for r in results if r.HasField("error")]
        assert all(r.error.code == grpc.StatusCode.UNAVAILABLE.value[0] for r in refused)
        assert [r.tag for r in ok] == list(range(len(ok)))  # every accepted step answered, in order
        assert ok[-1].position == len(ok)
        channel.close()
    finally:
        finish(proc)
    assert any("shutting down" in line for line in lines)


def test_device_cuda_is_refused_without_cuda(tiny_models):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has a CUDA-enabled onnxruntime")
    models_dir, _ = tiny_models
    proc = subprocess.run(
        [sys.executable, "-m", "seqserve", "serve", "--models", str(models_dir), "--port", "0", "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    message = proc.stderr.strip().splitlines()
    assert len(message) == 1 and "CUDA" in message[0] and "onnxruntime-gpu" in message[0], proc.stderr


def test_user_errors_are_one_line(tmp_path):
    cases = [
        (["--models", str(tmp_path / "nowhere")], "does not exist"),
        (["--models", str(tmp_path), "--max-batch", "zero"], "max_batch"),
        (["--models", str(tmp_path), "--config", str(tmp_path / "missing.toml")], "missing.toml"),
    ]
    for args, words in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "seqserve", "serve", "--port", "0", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and words in lines[0], proc.stderr


def test_settings_from_file_env_and_flags(tiny_models, tmp_path):
    models_dir, _ = tiny_models
    config = tmp_path / "seqserve.toml"
    config.write_text(f'[server]\nmodels = "{models_dir}"\nport = 1\nbatching = "off"\nmax_sessions = 2\n')
    # the file says port 1 and batching off; the environment overrides the port, the flag batching
    proc, port, lines = start(["--config", str(config), "--batching", "on"], env={"SEQSERVE_PORT": "0"})
    try:
        assert port not in (0, 1)
        assert any("batching on" in line for line in lines)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service="seqserve.v1.SeqServe")).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.SeqServeStub(channel)
            oldest = stub.CreateSession(pb.CreateSessionRequest(model="lm-rnn")).session_id
            stub.CreateSession(pb.CreateSessionRequest(model="lm-rnn"))
            # max_sessions = 2 from the file, evicting by default: the oldest session goes
            stub.CreateSession(pb.CreateSessionRequest(model="lm-rnn"))
            with pytest.raises(grpc.RpcError) as info:
                stub.GetSession(pb.GetSessionRequest(session_id=oldest))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND and "evicted" in info.value.details()
        # a second server on the same port says so in one line
        clash = subprocess.run(
            [sys.executable, "-m", "seqserve", "serve", "--models", str(models_dir), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        lines = clash.stderr.strip().splitlines()
        assert clash.returncode == 1 and len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0], lines
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        finish(proc)


def test_help_lists_every_setting():
    from seqserve.server.config import setting_fields

    out = subprocess.run(
        [sys.executable, "-m", "seqserve", "serve", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    for f in setting_fields():
        assert "--" + f.name.replace("_", "-") in out
        assert "SEQSERVE_" + f.name.upper() in out.replace("\n", "").replace(" ", "")

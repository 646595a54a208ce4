"""Render the Grafana dashboard's main panels to a PNG from real data, without Grafana.

Starts ``seqserve serve`` (metrics on) and Debian's ``prometheus`` with the repository's scrape
config and alert rules (targets rewritten to loopback, scraping every second), drives a few
minutes' worth of varied traffic in ~90 s (streaming sessions ramping up and down, generations,
session churn, some refused requests), then asks Prometheus for each chosen panel's queries over
that time and draws them with matplotlib, titled as in the dashboard::

    python scripts/render_dashboard.py --models models --out docs/img/dashboard.png

Needs ``prometheus`` on PATH (scripts/setup.sh installs Debian's package as root).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "seqserve.json"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
# the dashboard's panels worth a picture, in reading order
PANELS = [
    "Requests per second by RPC",
    "Tokens per second by phase",
    "Step latency percentiles",
    "Batch size (rows per model run)",
    "Active sessions",
    "Errors by reason",
]
UNITS = {"reqps": "requests / s", "s": "seconds", "short": "", "bytes": "bytes"}
# a short run: rates over 10 s instead of the dashboard's minute
VARIABLES = {"instance": ".*", "model": ".*", "__rate_interval": "10s"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read()
    except OSError:
        return None


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            sys.exit(f"render_dashboard: timed out waiting for {what}")
        time.sleep(0.2)


def start_prometheus(work: Path, metrics_port: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ALERTS)]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["seqserve"]["static_configs"][0]["targets"] = [f"127.0.0.1:{metrics_port}"]
    jobs["prometheus"]["static_configs"][0]["targets"] = [f"127.0.0.1:{port}"]
    config["scrape_configs"] = [jobs["seqserve"], jobs["prometheus"]]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: get(f"http://127.0.0.1:{port}/-/ready") is not None, "Prometheus")
    return proc, port


def start_server(models: Path, metrics_port: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [sys.executable, "-m", "seqserve", "serve", "--models", str(models), "--port", str(port)]
    argv += ["--metrics-port", str(metrics_port), "--max-sessions", "300", "--when-full", "refuse"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def serving() -> bool:
        with grpc.insecure_channel(target) as channel:
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.RpcError:
                return False
            return answer.status == health_pb2.HealthCheckResponse.SERVING

    wait_for(serving, "the server", timeout=120)
    return proc, target


def traffic(target: str, model: str, seconds: float) -> None:
    """Streaming sessions ramping up and down, generations, session churn and a few refusals."""
    from seqserve.v1 import seqserve_pb2 as pb
    from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

    stop = time.monotonic() + seconds
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.SeqServeStub(channel)
    rng = random.Random(0)

    def streamer(index: int, sessions: int) -> None:
        start = seconds * index / 24  # workers join over the first half, leave over the second
        end = seconds - start / 2
        began = time.monotonic()
        while time.monotonic() - began < start:
            time.sleep(0.1)
        ids = [stub.CreateSession(pb.CreateSessionRequest(model=model)).session_id for _ in range(sessions)]
        answered = threading.Semaphore(0)

        def steps():  # closed loop: a session's next step goes once the round's answers are back
            i = 0
            while time.monotonic() - began < end and time.monotonic() < stop:
                for sid in ids:
                    yield pb.StepRequest(session_id=sid, tokens=[rng.randrange(32, 127)], tag=i)
                for _ in ids:
                    answered.acquire()
                i += 1

        for _ in stub.StepStream(steps()):
            answered.release()
        for sid in ids:
            stub.CloseSession(pb.CloseSessionRequest(session_id=sid))

    def generator() -> None:
        sid = stub.CreateSession(pb.CreateSessionRequest(model=model)).session_id
        while time.monotonic() < stop:
            for _ in stub.Generate(pb.GenerateRequest(session_id=sid, prompt=list(b"The "), max_tokens=64)):
                pass
            time.sleep(0.5)

    def troublemaker() -> None:
        while time.monotonic() < stop:
            try:
                stub.Step(pb.StepRequest(session_id="no-such-session", tokens=[1]))
            except grpc.RpcError:
                pass
            time.sleep(rng.uniform(0.2, 1.0))

    workers = [threading.Thread(target=streamer, args=(i, 16)) for i in range(12)]
    workers += [threading.Thread(target=generator) for _ in range(2)] + [threading.Thread(target=troublemaker)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    channel.close()


def query_range(port: int, expr: str, start: float, end: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": "1s"})
    body = get(f"http://127.0.0.1:{port}/api/v1/query_range?{params}")
    return json.loads(body)["data"]["result"] if body else []


def legend(fmt: str, labels: dict[str, str]) -> str:
    for key, value in labels.items():
        fmt = fmt.replace("{{" + key + "}}", value)
    return fmt or ", ".join(f"{k}={v}" for k, v in labels.items()) or "value"


def render(port: int, start: float, end: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {}
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            panels[inner.get("title")] = inner
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    for ax, title in zip(axes.flat, PANELS):
        panel = panels[title]
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in sorted(VARIABLES.items(), key=lambda kv: -len(kv[0])):
                expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
            for series in query_range(port, expr, start, end):
                points = [(float(t) - start, float(v)) for t, v in series["values"] if v not in ("NaN", "+Inf")]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, label=legend(target.get("legendFormat", ""), series["metric"]))
        ax.set_title(title)
        ax.set_xlabel("seconds")
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        ax.set_ylabel(UNITS.get(unit, unit))
        tops = [max(line.get_ydata()) for line in ax.get_lines()]
        if tops and min(tops) > 0 and max(tops) / min(tops) > 20:  # e.g. sessions next to their limits
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("seqserve dashboard panels, rendered from a real Prometheus scraping a real server")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models", help="models folder (default: models/)")
    parser.add_argument("--model", default="docs-lstm", help="model to drive (default: docs-lstm)")
    parser.add_argument("--seconds", type=float, default=90.0, help="traffic duration (default 90)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "dashboard.png")
    args = parser.parse_args()
    if shutil.which("prometheus") is None:
        sys.exit("render_dashboard: needs prometheus on PATH (Debian: apt-get install prometheus)")
    metrics_port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server, target = start_server(args.models, metrics_port)
        prometheus, port = start_prometheus(Path(tmp), metrics_port)
        try:
            start = time.time()
            print(f"driving {args.seconds:.0f} s of traffic at {target} ...", flush=True)
            traffic(target, args.model, args.seconds)
            time.sleep(3)  # the last scrapes: Prometheus polls every second
            render(port, start, time.time(), args.out)
        finally:
            for proc in (prometheus, server):
                proc.terminate()
                proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A real Prometheus (Debian's package) scrapes a real seqserve with the repository's own scrape
config and alert rules, after traffic whose effect on every series is known.

Checked: the series have the values the traffic implies; every PromQL expression of the Grafana
dashboard and of the alert rules runs on that Prometheus and returns data (an alert's threshold
is lifted for this, so the question is whether its series exist, not whether it fires); every
metric they name is one the server exports; ``promtool check metrics`` accepts the scrape.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from seqserve.server.api.app import ServerThread
from seqserve.server.config import ServerConfig
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc
from tests import deploy_support as deploy
from tests.metrics_support import free_port, scrape_text

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        not (shutil.which("prometheus") and shutil.which("promtool")),
        reason="needs Debian's prometheus package (scripts/setup.sh installs it when run as root)",
    ),
]
MODEL = 'model="lm-gru", version="1"'
STEPS, TOKENS_PER_STEP, PROMPT, GENERATED, SESSIONS = 5, 2, 3, 5, 4


class Prometheus:
    """A Prometheus process on loopback with the repository's config, targets rewritten."""

    def __init__(self, tmp: Path, metrics_port: int):
        self.port = free_port()
        config = deploy.load_yaml(deploy.PROMETHEUS_CONFIG)
        # scrape and evaluate every second, so a test needs seconds, not minutes
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(deploy.ALERT_RULES)]
        jobs = {job["job_name"]: job for job in config["scrape_configs"]}
        served = jobs["seqserve"]
        served["static_configs"][0]["targets"] = [f"127.0.0.1:{metrics_port}"]
        jobs["prometheus"]["static_configs"][0]["targets"] = [f"127.0.0.1:{self.port}"]
        config["scrape_configs"] = [served, jobs["prometheus"]]  # the gpu job discovers by DNS: not here
        path = tmp / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.log = (tmp / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={path}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.wait_for(lambda: self._get("/-/ready") is not None, "Prometheus ready")

    def _get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                return response.read()
        except OSError:
            return None

    def query(self, expr: str) -> list[dict]:
        body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert body is not None, f"query failed: {expr}"
        answer = json.loads(body)
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def names(self) -> set[str]:
        body = self._get("/api/v1/label/__name__/values")
        assert body is not None
        return set(json.loads(body)["data"])

    def wait_for(self, condition, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"prometheus exited: see {self.log.name}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)  # polling an external process's HTTP API: nothing to wait on instead

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


def drive_traffic(stub: pb_grpc.SeqServeStub, ids: list[str], last: bool) -> None:
    """One round: a session refused past the limit, streamed steps, a refused step; the last round
    also generates and closes a session."""
    with pytest.raises(grpc.RpcError) as full:  # max_sessions reached, refusing: a server-side limit
        stub.CreateSession(pb.CreateSessionRequest(model="lm-gru"))
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    steps = [pb.StepRequest(session_id=sid, tokens=[65] * TOKENS_PER_STEP, tag=i) for i in range(STEPS) for sid in ids]
    assert len(list(stub.StepStream(iter(steps)))) == len(steps)
    with pytest.raises(grpc.RpcError):
        stub.Step(pb.StepRequest(session_id=ids[0], tokens=[999]))
    if last:
        prompt = list(range(70, 70 + PROMPT))
        chunks = stub.Generate(pb.GenerateRequest(session_id=ids[1], prompt=prompt, max_tokens=GENERATED))
        assert sum(len(c.tokens) for c in chunks) == GENERATED
        stub.CloseSession(pb.CloseSessionRequest(session_id=ids[3]))


def lift_threshold(expr: str) -> str:
    """The alert's expression with every comparison against a number made always true (NaN aside)."""
    return re.sub(r"(==|!=|>=|<=|>|<)\s*-?[0-9.]+(e-?[0-9]+)?", ">= -Inf", expr)


@pytest.fixture(scope="module")
def scraped(tiny_models, tmp_path_factory):
    metrics_port = free_port()
    config = ServerConfig(
        models=str(tiny_models[0]), port=0, metrics_port=metrics_port, max_sessions=SESSIONS, when_full="refuse"
    )
    with ServerThread(config) as server:
        prometheus = Prometheus(tmp_path_factory.mktemp("prometheus"), metrics_port)
        channel = grpc.insecure_channel(server.address)
        try:
            stub = pb_grpc.SeqServeStub(channel)
            ids = [stub.CreateSession(pb.CreateSessionRequest(model="lm-gru")).session_id for _ in range(SESSIONS)]
            # Two rounds with a scrape between them: a counter first seen at its final value has no
            # rate yet, so every series the traffic makes must grow after its first scrape.
            for last in (False, True):
                drive_traffic(stub, ids, last)
                steps = (1 + last) * SESSIONS * STEPS
                prometheus.wait_for(
                    lambda: prometheus.query(f'seqserve_requests_total{{rpc="StepStream"}} == {steps}'),
                    "the round in Prometheus",
                )
            prometheus.wait_for(
                lambda: prometheus.query(f'seqserve_tokens_total{{{MODEL}, phase="generated"}} == {GENERATED}'),
                "the generation in Prometheus",
            )
            yield server, prometheus
        finally:
            channel.close()
            prometheus.stop()


def test_series_carry_what_the_traffic_implies(scraped):
    server, prometheus = scraped
    v = prometheus.value
    assert v('seqserve_requests_total{rpc="CreateSession", code="OK"}') == SESSIONS
    assert v('seqserve_requests_total{rpc="CreateSession", code="RESOURCE_EXHAUSTED", reason="SESSION_LIMIT"}') == 2
    assert v('seqserve_requests_total{rpc="StepStream", code="OK"}') == 2 * SESSIONS * STEPS
    assert v('seqserve_requests_total{rpc="Step", code="INVALID_ARGUMENT", reason="TOKEN_OUT_OF_RANGE"}') == 2
    assert v('seqserve_requests_total{rpc="Generate", code="OK"}') == 1
    assert v(f'seqserve_tokens_total{{{MODEL}, phase="stepped"}}') == 2 * SESSIONS * STEPS * TOKENS_PER_STEP
    assert v(f'seqserve_tokens_total{{{MODEL}, phase="prefilled"}}') == PROMPT
    assert v(f"seqserve_step_latency_seconds_count{{{MODEL}}}") == 2 * SESSIONS * STEPS
    assert v(f'seqserve_step_latency_seconds_bucket{{{MODEL}, le="+Inf"}}') == 2 * SESSIONS * STEPS
    # every step and the prompt is one row of a run; every generated token is fed once
    assert v(f"seqserve_batch_rows_sum{{{MODEL}}}") == 2 * SESSIONS * STEPS + 1 + GENERATED
    assert v(f"seqserve_batch_rows_count{{{MODEL}}}") == v(f"seqserve_model_runs_total{{{MODEL}}}")
    assert v(f"seqserve_sessions_active{{{MODEL}}}") == SESSIONS - 1
    assert v(f"seqserve_sessions_created_total{{{MODEL}}}") == SESSIONS
    assert v(f'seqserve_sessions_ended_total{{{MODEL}, reason="closed"}}') == 1
    slot = server.engine.registry.get("lm-gru").runtime.store.bytes_per_slot()
    assert v(f"seqserve_state_bytes{{{MODEL}}}") == (SESSIONS - 1) * slot
    assert v("seqserve_serving") == 1 and v('up{job="seqserve"}') == 1


def test_every_dashboard_panel_returns_data(scraped):
    _, prometheus = scraped
    empty = [f"{q.panel}: {q.expr}" for q in deploy.dashboard_queries() if not prometheus.query(q.expr)]
    assert not empty, "panels without data:\n" + "\n".join(empty)
    for name, query in deploy.dashboard_variable_queries().items():  # label_values(metric, label)
        metric = re.match(r"label_values\((.+),\s*\w+\)", query)
        assert metric and prometheus.query(deploy.substitute(metric.group(1))), (name, query)


def test_every_alert_expression_returns_data(scraped):
    _, prometheus = scraped
    empty = [f"{name}: {lift_threshold(expr)}" for name, expr in deploy.alert_expressions().items()]
    empty = [line for line in empty if not prometheus.query(line.split(": ", 1)[1])]
    assert not empty, "alerts whose series do not exist:\n" + "\n".join(empty)
    # and nothing fires on a healthy server (the rules were loaded and evaluated)
    rules = prometheus._get("/api/v1/rules")
    assert rules is not None
    groups = json.loads(rules)["data"]["groups"]
    loaded = {rule["name"] for group in groups for rule in group["rules"]}
    assert loaded == set(deploy.alert_expressions())
    firing = {rule["name"] for group in groups for rule in group["rules"] if rule.get("state") == "firing"}
    assert not firing, firing


def test_expressions_name_only_exported_metrics(scraped):
    _, prometheus = scraped
    exported = prometheus.names()
    expressions = deploy.dashboard_expressions() + list(deploy.alert_expressions().values())
    named = set().union(*(deploy.metric_names(e) for e in expressions))
    assert named and not named - exported, sorted(named - exported)


def test_promtool_accepts_the_scrape(scraped):
    server, _ = scraped
    text = scrape_text(server.server.metrics.port)
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr

"""Prometheus metrics: read, at scrape time, from the counters the server keeps anyway.

Nothing here runs per request. The scheduler keeps its run counters and histograms
(server/stats.py), the session table its created/ended counts and session ages, the state store
its bytes, and the servicers their request outcomes (calls.py); ``EngineCollector.collect`` turns
them into metric families when Prometheus scrapes ``/metrics``. The HTTP server is
prometheus-client's own, on its own thread and port: a scrape reads copies of those counters and
never waits for the event loop, so metrics still answer when the loop is stuck, which is when an
operator needs them most.

Names and labels are documented in docs/operations.md; labels are low-cardinality only (model,
version, rpc, code, reason, phase, device), never a session id.
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Callable, Iterator
from importlib import metadata
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from ..engine import Engine
from ..stats import AGE_BOUNDS, Histogram
from .calls import CallCounts

MODEL = ["model", "version"]
NO_AGES = Histogram(AGE_BOUNDS)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def _histogram(family: HistogramMetricFamily, labels: list[str], h: Histogram) -> None:
    # the event loop may observe meanwhile: the sum can be one observation ahead of the buckets
    family.add_metric(labels, h.cumulative(), h.sum)


class EngineCollector:
    """A prometheus-client collector over one engine and its servicers' call counts."""

    def __init__(self, engine: Engine, calls: CallCounts, serving: Callable[[], bool]):
        self.engine = engine
        self.calls = calls
        self.serving = serving
        self.build = {
            "version": _version("seqserve"),
            "python": platform.python_version(),
            "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
            "grpc": _version("grpcio"),
        }

    def collect(self) -> Iterator[Metric]:
        yield from self._process()
        yield from self._requests()
        yield from self._models()
        yield from self._runs()
        yield from self._sessions()

    def _process(self) -> Iterator[Metric]:
        build = GaugeMetricFamily("seqserve_build_info", "seqserve build; the value is 1", labels=list(self.build))
        build.add_metric(list(self.build.values()), 1)
        yield build
        yield GaugeMetricFamily(
            "seqserve_serving", "1 while the health service reports SERVING, else 0", value=int(self.serving())
        )

    def _requests(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "seqserve_requests",
            "requests answered: unary calls, and each message of a StepStream, each step of a PackedStepStream message; reason is empty when OK",
            labels=["rpc", "code", "reason"],
        )
        for (rpc, code, reason), n in sorted(self.calls.counts.copy().items()):
            family.add_metric([rpc, code, reason], n)
        yield family
        streams = GaugeMetricFamily("seqserve_streams_open", "bidirectional streams open", labels=["rpc"])
        for rpc, n in sorted(self.calls.open_streams.copy().items()):
            streams.add_metric([rpc], n)
        yield streams

    def _models(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "seqserve_model_info",
            "a loaded model version; the value is 1",
            labels=MODEL + ["kind", "cell", "layers", "hidden", "provider", "device"],
        )
        load = GaugeMetricFamily("seqserve_model_load_seconds", "time to load a model version", labels=MODEL)
        state = GaugeMetricFamily(
            "seqserve_state_bytes", "recurrent state held for open sessions", labels=MODEL + ["device"]
        )
        capacity = GaugeMetricFamily(
            "seqserve_state_capacity_bytes", "state memory reserved (grows in steps)", labels=MODEL + ["device"]
        )
        for model in self.engine.registry.all():
            m, rt = model.manifest, model.runtime
            labels = [model.name, str(model.version)]
            info.add_metric(labels + [m.kind, m.cell, str(m.layers), str(m.hidden_size), rt.provider, rt.device], 1)
            load.add_metric(labels, model.load_seconds)
            state.add_metric(labels + [rt.device], rt.store.state_bytes())
            capacity.add_metric(labels + [rt.device], rt.store.allocated_bytes())
        yield from (info, load, state, capacity)

    def _runs(self) -> Iterator[Metric]:
        runs = CounterMetricFamily("seqserve_model_runs", "model runs", labels=MODEL)
        failures = CounterMetricFamily("seqserve_model_run_failures", "model runs that raised", labels=MODEL)
        tokens = CounterMetricFamily(
            "seqserve_tokens",
            "positions processed: stepped (Step and StepStream input), prefilled (Generate prompts), "
            "generated (tokens sampled)",
            labels=MODEL + ["phase"],
        )
        latency = HistogramMetricFamily(
            "seqserve_step_latency_seconds", "a step from accepted to answered", labels=MODEL
        )
        wait = HistogramMetricFamily(
            "seqserve_queue_wait_seconds", "a step or prompt from accepted to the start of its model run", labels=MODEL
        )
        run_time = HistogramMetricFamily("seqserve_model_run_seconds", "one model run", labels=MODEL)
        rows = HistogramMetricFamily("seqserve_batch_rows", "rows (sessions) per model run", labels=MODEL)
        depth = GaugeMetricFamily("seqserve_queue_depth", "sessions with steps waiting for a model run", labels=MODEL)
        lanes = GaugeMetricFamily("seqserve_generation_rows", "generations being decoded", labels=MODEL)
        schedulers = self.engine.schedulers
        for model in self.engine.registry.all():
            scheduler = schedulers.get(model.key)
            if scheduler is None:
                continue
            st = scheduler.stats
            labels = [model.name, str(model.version)]
            runs.add_metric(labels, st.runs)
            failures.add_metric(labels, st.failures)
            tokens.add_metric(labels + ["stepped"], st.stepped)
            tokens.add_metric(labels + ["prefilled"], st.prefilled)
            tokens.add_metric(labels + ["generated"], st.generated)
            _histogram(latency, labels, st.step_latency)
            _histogram(wait, labels, st.queue_wait)
            _histogram(run_time, labels, st.run_seconds)
            _histogram(rows, labels, st.batch_rows)
            depth.add_metric(labels, scheduler.queue_depth)
            lanes.add_metric(labels, scheduler.generation_rows)
        yield from (runs, failures, tokens, latency, wait, run_time, rows, depth, lanes)

    def _sessions(self) -> Iterator[Metric]:
        table, cfg = self.engine.table, self.engine.config
        active = GaugeMetricFamily("seqserve_sessions_active", "open sessions", labels=MODEL)
        created = CounterMetricFamily("seqserve_sessions_created", "sessions created", labels=MODEL)
        ended = CounterMetricFamily(
            "seqserve_sessions_ended",
            "sessions ended: closed (CloseSession), expired (idle past the TTL), evicted (least recently "
            "used, to make room), shutdown (the server stopped while it had work)",
            labels=MODEL + ["reason"],
        )
        ages = HistogramMetricFamily(
            "seqserve_session_age_seconds", "a session's age when it ended", labels=MODEL + ["reason"]
        )
        open_by, created_by = table.per_model.copy(), table.created.copy()
        ended_by, ages_by = table.ended_by.copy(), table.ages.copy()
        for model in self.engine.registry.all():
            key, labels = model.key, [model.name, str(model.version)]
            active.add_metric(labels, open_by.get(key, 0))
            created.add_metric(labels, created_by.get(key, 0))
            for reason in ("closed", "expired", "evicted", "shutdown"):
                ended.add_metric(labels + [reason], ended_by.get((key, reason), 0))
                # an empty histogram until the first such end, so that end shows in rate() too
                _histogram(ages, labels + [reason], ages_by.get((key, reason)) or NO_AGES)
        yield from (active, created, ended, ages)
        yield GaugeMetricFamily(
            "seqserve_sessions_limit", "max_sessions: open sessions allowed", value=cfg.max_sessions
        )
        yield GaugeMetricFamily(
            "seqserve_sessions_limit_per_model",
            "max_sessions_per_model: open sessions allowed on one model version",
            value=cfg.max_sessions_per_model,
        )


class MetricsServer:
    """``/metrics`` over HTTP on its own thread (prometheus-client's server)."""

    def __init__(self, collector: EngineCollector):
        self.registry = CollectorRegistry()
        # process_* (CPU, memory, open files, start time) and python_* (version, GC), as usual
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(collector)
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self, host: str, port: int) -> int:
        self._httpd, self._thread = start_http_server(port, host.strip("[]"), registry=self.registry)
        self.port = self._httpd.server_port
        return self.port

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

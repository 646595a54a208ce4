"""Build the gRPC server around an engine, run it, and shut it down gracefully.

``serve(config)`` is what ``seqserve serve`` runs. Start-up: bind the port, serve the health
service as NOT_SERVING while the models load (on a worker thread, so health answers meanwhile),
then SERVING. SIGTERM/SIGINT: health turns NOT_SERVING at once (load balancers stop sending new
work while the port is still open), accepted steps and generations finish (up to
``shutdown_grace_s``), open streams end with UNAVAILABLE, and it returns 0. Metrics, when on, are
served on their own port from the start. ``ServerThread`` runs the same server on a background
thread with its own event loop, for tests and benchmarks in one process.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from ..affinity import pin_loop_thread
from ..config import ServerConfig
from ..engine import Engine
from .calls import CallCounts
from .kserve import SERVICE as KSERVE_SERVICE
from .kserve import KServeServicer, add_to_server
from .metrics import EngineCollector, MetricsServer
from .servicer import SeqServeServicer

log = logging.getLogger("seqserve.server")
SERVICE = pb.DESCRIPTOR.services_by_name["SeqServe"].full_name
MESSAGE_LIMIT = 64 * 1024 * 1024


class StartError(Exception):
    """The server cannot start (address in use, no usable models, ...)."""


class Server:
    """One engine behind one grpc.aio server."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.engine = Engine(config)
        self.port = 0
        self.calls = CallCounts()
        self.serving = False  # what the health service says (for the seqserve_serving metric)
        self.metrics: MetricsServer | None = None
        self._grpc: grpc.aio.Server | None = None
        self._servicer: SeqServeServicer | None = None
        self._kserve: KServeServicer | None = None  # the KServe v2 / Triton API (kserve.py)
        self._health: health.aio.HealthServicer | None = None

    @property
    def services(self) -> list[str]:
        """The health service's names: "" (the whole server) and each service served."""
        return ["", SERVICE, KSERVE_SERVICE]

    async def _set_health(self, serving: bool) -> None:
        assert self._health is not None
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.services:
            await self._health.set(name, status)
        self.serving = serving

    async def start(self) -> int:
        """Bind (first, so a taken port fails fast), report NOT_SERVING while models load, then
        SERVING; return the port."""
        cfg = self.config
        self.engine.registry.find()  # a wrong models folder fails before anything listens
        self._grpc = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MESSAGE_LIMIT),
                ("grpc.max_send_message_length", MESSAGE_LIMIT),
                ("grpc.so_reuseport", 0),
                # accept client keepalive pings every 10 s, even on an
                # idle connection, so long-lived streams survive NATs
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ]
        )
        self._servicer = SeqServeServicer(self.engine, self.calls)
        pb_grpc.add_SeqServeServicer_to_server(self._servicer, self._grpc)
        self._kserve = add_to_server(self.engine, self._grpc, self.calls)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        reflection.enable_server_reflection(
            [SERVICE, KSERVE_SERVICE, reflection.SERVICE_NAME, "grpc.health.v1.Health"], self._grpc
        )
        address = f"{cfg.host}:{cfg.port}"
        try:
            _check_port(cfg.host, cfg.port)
            self.port = self._grpc.add_insecure_port(address)
        except (OSError, RuntimeError) as exc:
            raise StartError(f"cannot listen on {address}: {exc}") from None
        if cfg.metrics_port:
            self.metrics = MetricsServer(EngineCollector(self.engine, self.calls, lambda: self.serving))
            metrics_host = cfg.metrics_host or cfg.host
            try:
                self.metrics.start(metrics_host, cfg.metrics_port)
            except OSError as exc:
                raise StartError(f"cannot serve metrics on {metrics_host}:{cfg.metrics_port}: {exc}") from None
        await self._set_health(False)
        try:
            await self._grpc.start()
            log.info("port %d open, health NOT_SERVING: loading models from %s", self.port, cfg.models)
            await asyncio.get_running_loop().run_in_executor(None, self.engine.load)
            try:  # after gRPC's threads exist, so they keep every CPU
                cpu = pin_loop_thread(cfg.loop_cpu)
            except ValueError as exc:
                raise StartError(f"loop_cpu: {exc}") from None
        except BaseException:
            await self._grpc.stop(None)
            self._stop_metrics()
            raise
        if cfg.gil_switch_ms:
            sys.setswitchinterval(cfg.gil_switch_ms / 1000.0)  # for the whole process: it serves
        await self.engine.start()
        await self._set_health(True)
        if self.metrics is not None:
            log.info("metrics on http://%s:%d/metrics", cfg.metrics_host or cfg.host, self.metrics.port)
        log.info(
            "listening on %s:%d (device %s, batching %s, event loop %s)",
            cfg.host,
            self.port,
            self.engine.registry.device,
            cfg.batching,
            "on CPU %d" % cpu if cpu is not None else "not pinned",
        )
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: refuse new work, finish accepted work, end streams, close."""
        grace = self.config.shutdown_grace_s if grace is None else grace
        if self._health is not None:
            self.serving = False
            await self._health.enter_graceful_shutdown()  # NOT_SERVING for every name, from now on
        finished = await self.engine.drain(grace)
        if not finished:
            log.warning("shutdown: work still queued after %.1f s; cancelling it", grace)
        if self._servicer is not None:
            self._servicer.close_streams()
        if self._kserve is not None:
            self._kserve.close_streams()
        if self._grpc is not None:
            await self._grpc.stop(1.0 if finished else 0)
        await self.engine.stop()
        self._stop_metrics()

    def _stop_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.stop()


def _check_port(host: str, port: int) -> None:
    """Raise OSError if ``host:port`` cannot be bound (gRPC would only log it in its own format)."""
    if port == 0:
        return
    family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT, then shut down gracefully; return the exit code."""
    server = Server(config)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: finishing in-flight work")
    await server.stop()
    log.info("stopped")
    return 0


class ServerThread:
    """A server on a background thread (its own event loop): ``with ServerThread(cfg) as s: s.port``."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.server = Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._stopped: asyncio.Event | None = None

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def engine(self) -> Engine:
        return self.server.engine

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def start(self) -> "ServerThread":
        self._thread = threading.Thread(target=self._main, name="seqserve-server", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        try:
            await self.server.start()
        except BaseException as exc:
            self._error = exc
            self._started.set()
            return
        self._started.set()
        await self._stopped.wait()
        await self.server.stop()

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the server's loop and return its result (for tests)."""

        async def run():
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result()

    def stop(self) -> None:
        if self.loop is not None and self._stopped is not None and self._thread is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(timeout=30)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

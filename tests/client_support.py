"""Helpers for the client tests: a real server subprocess, CLI runs, and the adapter that runs one
test body against both SDK flavours (the cuttable TCP proxy is in proxy_support.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_LISTENING = re.compile(r"listening on (\S+:\d+)")


class LiveServer:
    """``seqserve serve`` on a free loopback port, in its own process."""

    def __init__(self, models_dir: Path, *extra: str, startup_timeout: float = 60.0):
        self.log: list[str] = []
        cmd = [
            sys.executable,
            "-m",
            "seqserve",
            "serve",
            "--models",
            str(models_dir),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            *extra,
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.target = self._wait_listening(startup_timeout)
        # Keep draining the output so the server never blocks on a full pipe.
        self._drain = threading.Thread(target=self._read_rest, daemon=True)
        self._drain.start()

    def _wait_listening(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline()
                if line:
                    self.log.append(line)
                    match = _LISTENING.search(line)
                    if match:
                        return match.group(1)
            if self.proc.poll() is not None:
                rest = self.proc.stdout.read() or ""
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{''.join(self.log)}{rest}")
        self.stop()
        raise RuntimeError(f"server did not report 'listening on' within {timeout}s:\n{''.join(self.log)}")

    def _read_rest(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)

    @property
    def port(self) -> int:
        return int(self.target.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


class ClosedPort:
    """A loopback port that refuses connections: bound by us but never listening (no other process can take it)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self._sock.getsockname()[1]}"

    def __enter__(self) -> "ClosedPort":
        return self

    def __exit__(self, *exc) -> None:
        self._sock.close()


_SHARED: dict[str, LiveServer] = {}


def shared_server(request, models_dir: Path) -> LiveServer:
    """One server per model directory for the whole test run, stopped when the run ends."""
    key = str(models_dir)
    server = _SHARED.get(key)
    if server is None or server.proc.poll() is not None:
        server = LiveServer(models_dir)
        _SHARED[key] = server
        request.config.add_cleanup(server.stop)
    return server


def run_cli(
    *args: str,
    target: str | None = None,
    stdin: str | None = None,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m seqserve client ...``; stdout/stderr decoded as UTF-8 with newlines kept as sent."""
    cmd = [sys.executable, "-m", "seqserve", "client"]
    if target is not None:
        cmd += ["--target", target]
    cmd += list(args)
    proc = subprocess.run(
        cmd,
        input=None if stdin is None else stdin.encode("utf-8"),
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})},
    )
    proc.stdout = proc.stdout.decode("utf-8")
    proc.stderr = proc.stderr.decode("utf-8")
    return proc


# -- both flavours from one test body ------------------------------------------------------------


class LoopThread:
    """An asyncio event loop running in a daemon thread, for driving the asyncio SDK from blocking code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self._thread.start()

    def run(self, awaitable, timeout: float = 120.0):
        """Await ``awaitable`` on the loop and return its result (or raise its exception), bounded in time."""

        async def wait():
            return await awaitable

        return asyncio.run_coroutine_threadsafe(wait(), self.loop).result(timeout)

    def bridge(self, future: "asyncio.Future") -> concurrent.futures.Future:
        """A concurrent future mirroring an asyncio one; cancelling it cancels the asyncio future."""
        mirror: concurrent.futures.Future = concurrent.futures.Future()

        def copy(done: asyncio.Future) -> None:
            if done.cancelled():
                mirror.cancel()
            elif done.exception() is not None:
                mirror.set_exception(done.exception())
            else:
                mirror.set_result(done.result())

        def watch() -> None:
            future.add_done_callback(copy)

        mirror.add_done_callback(lambda m: m.cancelled() and self.loop.call_soon_threadsafe(future.cancel))
        self.loop.call_soon_threadsafe(watch)
        return mirror

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class Blocking:
    """Drives one asyncio SDK object from blocking code, with the blocking SDK's protocol.

    Only the asyncio protocol is translated: awaitables are awaited on the loop, ``async for`` becomes
    ``for``, ``async with`` becomes ``with``, ``aclose()`` is reached as ``close()``, and an
    ``asyncio.Future`` comes back as a ``concurrent.futures.Future``. Names, arguments, results and
    errors are the asyncio object's own, so a test body written against the blocking API checks the
    asyncio one too, and a difference between the two flavours fails it.
    """

    def __init__(self, obj, runner: LoopThread):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_runner", runner)

    def _wrap(self, value):
        from seqserve.client import AsyncChunkStream, AsyncClient, AsyncGeneration, AsyncSession, AsyncStepStream

        if inspect.isawaitable(value) and not isinstance(value, asyncio.Future):
            value = self._runner.run(value)
        if isinstance(value, asyncio.Future):
            return self._runner.bridge(value)
        if isinstance(value, (AsyncClient, AsyncSession, AsyncGeneration, AsyncChunkStream, AsyncStepStream)):
            return Blocking(value, self._runner)
        return value

    @staticmethod
    def _unwrap(value):
        return value._obj if isinstance(value, Blocking) else value

    def __getattr__(self, name: str):
        if name == "close" and hasattr(self._obj, "aclose"):
            name = "aclose"
        value = getattr(self._obj, name)
        if not inspect.ismethod(value):
            return self._wrap(value)  # a property or plain attribute

        @functools.wraps(value)
        def call(*args, **kwargs):
            args = [self._unwrap(a) for a in args]
            kwargs = {k: self._unwrap(v) for k, v in kwargs.items()}
            return self._wrap(value(*args, **kwargs))

        return call

    def __iter__(self) -> "Blocking":
        return self

    def __next__(self):
        try:
            return self._wrap(self._obj.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def __enter__(self):
        return self._wrap(self._obj.__aenter__())

    def __exit__(self, *exc_info) -> None:
        self._runner.run(self._obj.__aexit__(*exc_info))

    def __repr__(self) -> str:
        return f"Blocking({self._obj!r})"


FLAVOURS = ["sync", "async"]


class Flavour:
    """Makes clients of one flavour: the blocking ``Client``, or an ``AsyncClient`` behind :class:`Blocking`."""

    def __init__(self, name: str):
        self.name = name
        self._runner: LoopThread | None = None

    def client(self, target: str | None = None, **kwargs):
        from seqserve.client import AsyncClient, Client

        if self.name == "sync":
            return Client(target, **kwargs)
        if self._runner is None:
            self._runner = LoopThread()
        return Blocking(AsyncClient(target, **kwargs), self._runner)

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()


def flavour_fixture(request):
    """Body of a ``flavour`` fixture parametrized over :data:`FLAVOURS`."""
    flavour = Flavour(request.param)
    yield flavour
    flavour.close()

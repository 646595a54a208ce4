"""Child processes of a benchmark run: the system under test and the load generators.

Everything runs as a separate process so that the harness itself costs no CPU while a measurement
is on, and so that each system can be started fresh and stopped completely before the next one.
"""

from __future__ import annotations

import collections
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

_LISTENING = re.compile(r"listening on (\S+):(\d+)")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")


class BenchProcessError(RuntimeError):
    """A child process failed to start or answered with an error."""


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc), so RSS and CPU cover worker children too."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children[int(fields[1])].append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def free_port() -> int:
    """A loopback port free right now (for a server flag that takes a port and has no "pick one")."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (from /proc/stat), to spot other load."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _TICKS


def run_raw_loop(
    bundle: Path, plan: list[dict], warmup_s: float, duration_s: float, device: str
) -> tuple[list[dict], float]:
    """Run the raw ONNX Runtime loops (``raw_ort.py``) over ``plan`` in a child process: its
    results, and the cores other processes used meanwhile."""
    argv = [
        sys.executable,
        "-m",
        "seqserve.bench.raw_ort",
        "--bundle",
        str(bundle),
        "--plan",
        json.dumps(plan),
        "--warmup",
        str(warmup_s),
        "--duration",
        str(duration_s),
        "--device",
        device,
    ]
    budget = len(plan) * (warmup_s + duration_s) * 3 + 120
    busy0, t0 = machine_busy_seconds(), time.monotonic()
    own0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=budget)
    own1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = own1.ru_utime + own1.ru_stime - own0.ru_utime - own0.ru_stime
    other_cores = max(0.0, (machine_busy_seconds() - busy0 - own) / (time.monotonic() - t0))
    if proc.returncode != 0:
        raise BenchProcessError(f"raw ONNX Runtime baseline failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout), other_cores


class ServingProcess:
    """A server (``seqserve serve`` or the echo) started on port 0; knows the address it bound."""

    def __init__(self, argv: list[str], name: str, start_timeout_s: float = 120.0):
        self.name = name
        self.argv = argv
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.address = self._await_listening(start_timeout_s)
        self._drain = threading.Thread(target=self._drain_output, daemon=True)
        self._drain.start()

    def _await_listening(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.tail.append(line.rstrip())
            match = _LISTENING.search(line)
            if match:
                return f"{match.group(1)}:{match.group(2)}"
        self.stop()
        raise BenchProcessError(
            f"{self.name} did not report 'listening on HOST:PORT' "
            f"(command: {' '.join(self.argv)}); its last output:\n  " + "\n  ".join(self.tail)
        )

    def _drain_output(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.tail.append(line.rstrip())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_bytes(self) -> int:
        """Resident memory of the process and its children."""
        total = 0
        for pid in _descendants(self.pid):
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
            except OSError:
                pass
        return total

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far by the process and its children."""
        total = 0.0
        for pid in _descendants(self.pid):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / _TICKS
        return total

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchProcessError(
                f"{self.name} exited with code {self.proc.returncode}; its last output:\n  " + "\n  ".join(self.tail)
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


class LoadGenerators:
    """A few ``seqserve.bench.loadgen`` processes aimed at one address, driven in lockstep."""

    def __init__(self, address: str, count: int):
        argv = [sys.executable, "-m", "seqserve.bench.loadgen", "--target", address]
        self.procs = [
            subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
            for _ in range(count)
        ]

    def _ask(self, commands: list[dict | None], timeout_s: float) -> list[dict]:
        """Send each process its command (None: skip it) and collect the answers."""
        active = [(p, c) for p, c in zip(self.procs, commands) if c is not None]
        for proc, cmd in active:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(cmd) + "\n")
            proc.stdin.flush()
        answers = []
        deadline = time.monotonic() + timeout_s
        for proc, cmd in active:
            line = _readline_before(proc, deadline)
            if not line:
                raise BenchProcessError(f"load generator exited during {cmd['cmd']!r} (code {proc.poll()})")
            answer = json.loads(line)
            if not answer.get("ok"):
                raise BenchProcessError(f"load generator failed during {cmd['cmd']!r}: {answer.get('error')}")
            answers.append(answer)
        return answers

    def run(self, per_proc: list[dict | None], warmup_s: float, duration_s: float, on_go=None) -> list[dict]:
        """Prepare every process, then start their traffic at one moment; return their tallies.

        ``on_go`` (optional) is called once everything is prepared, just before the traffic starts.
        """
        self._ask(per_proc, timeout_s=300)
        if on_go is not None:
            on_go()
        start = time.time() + 0.2
        go = {"cmd": "go", "start": start, "warmup": warmup_s, "duration": duration_s}
        return self._ask([go if c is not None else None for c in per_proc], timeout_s=warmup_s + duration_s + 120)

    def each(self, per_proc: list[dict | None], timeout_s: float = 600) -> list[dict]:
        return self._ask(per_proc, timeout_s)

    def close(self) -> None:
        for proc in self.procs:
            try:
                if proc.poll() is None and proc.stdin is not None:
                    proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                    proc.stdin.flush()
            except BrokenPipeError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _readline_before(proc: subprocess.Popen, deadline: float) -> str:
    """One line of the process's stdout, or '' if it exits or the deadline passes (then it is killed)."""
    stdout = proc.stdout
    assert stdout is not None
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(max(0.0, deadline - time.monotonic()))
    if reader.is_alive():
        proc.kill()
        reader.join(5)
        raise BenchProcessError("load generator did not answer in time (killed)")
    return result[0] if result else ""

"""The memory measurement: how much a server's RSS grows with many idle sessions, against the raw
bytes of their state (sessions × ``state_bytes_per_session`` from the manifest)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .procs import LoadGenerators

if TYPE_CHECKING:
    from .runner import Runner


@dataclass
class MemoryResult:
    """Server memory before and after creating idle sessions (and after one step in each)."""

    repeat: int
    sessions: int
    state_bytes_per_session: int
    rss_before: int
    rss_created: int
    rss_touched: int
    create_s: float
    touch_s: float

    @property
    def raw_state_bytes(self) -> int:
        return self.sessions * self.state_bytes_per_session

    def ratio(self, after: int) -> float:
        return (after - self.rss_before) / self.raw_state_bytes if self.raw_state_bytes else float("nan")


def measure_memory(runner: Runner, repeat: int) -> MemoryResult:
    """A fresh server; its RSS before, after creating the idle sessions, and after one 1-token step
    in each (which makes every slot resident)."""
    cfg, name, log = runner.cfg, runner.model.name, runner.log
    server = runner.start("server", _memory_flags(cfg.idle_sessions))
    lgs = LoadGenerators(server.address, cfg.client_procs)
    try:
        first = [{"cmd": "create", "model": name, "count": 1}] + [None] * (len(lgs.procs) - 1)
        lgs.each(first)
        lgs.each([{"cmd": "touch"}] + [None] * (len(lgs.procs) - 1))
        time.sleep(0.5)  # RSS settles after the first session's allocations
        before = server.rss_bytes()
        shares = runner.jobs(lgs, {}, cfg.idle_sessions)
        t0 = time.monotonic()
        lgs.each(
            [{"cmd": "create", "model": name, "count": j["sessions"], "concurrency": 64} if j else None for j in shares]
        )
        create_s = time.monotonic() - t0
        time.sleep(0.5)
        created = server.rss_bytes()
        t0 = time.monotonic()
        touched = lgs.each([{"cmd": "touch", "streams": cfg.streams_per_proc} if j else None for j in shares])
        touch_s = time.monotonic() - t0
        time.sleep(0.5)
        after_touch = server.rss_bytes()
        server.check_alive()
        errors = sum(t["errors"] for t in touched)
        if errors:
            log(f"  !! {errors} steps failed while touching idle sessions: {touched[0]['first_error']}")
    finally:
        lgs.close()
        server.stop()
    result = MemoryResult(
        repeat,
        cfg.idle_sessions,
        runner.model.bundle.manifest.state_bytes_per_session(),
        before,
        created,
        after_touch,
        create_s,
        touch_s,
    )
    log(
        f"  memory: {cfg.idle_sessions:,} sessions created in {create_s:.1f} s: "
        f"RSS +{(created - before) / 2**20:,.1f} MiB "
        f"({result.ratio(created):.2f}x their {result.raw_state_bytes / 2**20:,.1f} MiB of state); "
        f"after one step each ({touch_s:.1f} s): +{(after_touch - before) / 2**20:,.1f} MiB "
        f"({result.ratio(after_touch):.2f}x)"
    )
    return result


def _memory_flags(idle_sessions: int) -> list[str]:
    """Server flags so that the idle sessions all fit and none expires during the measurement."""
    room = str(idle_sessions + 1000)
    return ["--max-sessions", room, "--max-sessions-per-model", room, "--idle-ttl-s", "0"]

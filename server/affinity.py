"""Where the server's threads run, and at what OS priority.

The event loop reads a step, runs the model, renders and writes the result; when the kernel moves
that thread between cores, each step starts with cold caches, so pinning it is faster (figures in
docs/bench.md, "Settings chosen by measurement"). Only the loop thread is pinned; the model thread and
gRPC's threads keep every CPU the process may use (``Unpinned`` is the model thread's initializer).

The thread that feeds long prompts in pieces runs at a lower priority (``Lowered``): while the
cores are busy, the kernel then gives them to the threads other sessions' steps wait on, and the
long prompt takes the time they leave (docs/server.md, "Long steps and prompts run in pieces").
"""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger("seqserve.server")


def allowed_cpus() -> set[int] | None:
    """The CPUs this process may run on, or None where the OS cannot pin threads."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return set(os.sched_getaffinity(0))


def parse_choice(value: str) -> str | int:
    """'auto', 'none' or a CPU number; ValueError with a usable message otherwise."""
    text = str(value).strip().lower()
    if text in ("auto", "none"):
        return text
    if text.isdigit():
        return int(text)
    raise ValueError(f"must be auto, none or a CPU number, got {value!r}")


def _current_cpu() -> int | None:
    """The CPU the calling thread last ran on (field 39 of /proc/thread-self/stat)."""
    try:
        with open("/proc/thread-self/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[36])
    except (OSError, IndexError, ValueError):
        return None


def pin_loop_thread(setting: str) -> int | None:
    """Pin the calling thread as ``setting`` says; return the CPU, or None when left unpinned."""
    choice = parse_choice(setting)
    cpus = allowed_cpus()
    if choice == "none" or cpus is None:
        return None
    if choice == "auto":
        if len(cpus) < 2:  # one CPU: nothing to choose, and nothing to gain
            return None
        here = _current_cpu()
        cpu = here if here in cpus else min(cpus)
    else:
        if choice not in cpus:
            raise ValueError(f"CPU {choice} is not one this process may use ({', '.join(map(str, sorted(cpus)))})")
        cpu = choice
    os.sched_setaffinity(0, {cpu})
    return cpu


class Unpinned:
    """A thread initializer that gives the thread back every CPU the process had when this was made
    (threads inherit the mask of the thread that starts them, and the loop thread may be pinned)."""

    def __init__(self):
        self.cpus = allowed_cpus()

    def __call__(self) -> None:
        if self.cpus:
            os.sched_setaffinity(0, self.cpus)


class Lowered(Unpinned):
    """A thread initializer: every CPU (as ``Unpinned``), and ``nice`` steps lower OS priority than
    the process (Linux keeps a nice value per thread; elsewhere the priority is left alone)."""

    def __init__(self, nice: int):
        super().__init__()
        self.nice = nice

    def __call__(self) -> None:
        super().__call__()
        lower_priority(self.nice)


def lower_priority(nice: int) -> None:
    """Add ``nice`` (capped at 19) to the calling thread's nice value; left alone where the OS keeps
    no value per thread (not Linux), or with a warning where it refuses."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:  # raising one's own nice value needs no privilege
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:
        log.warning("could not lower the priority of thread %s: %s", threading.current_thread().name, exc)

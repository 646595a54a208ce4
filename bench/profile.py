"""Optional sampling profile of the server during one workload (``seqserve bench --profile stream-256``).

Uses py-spy (``pip install py-spy``) attached to the server process for the measurement, writes
its collapsed stacks next to the results, and summarises where the samples fall.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
from pathlib import Path


class ProfilerMissing(RuntimeError):
    """py-spy is not installed."""


def find_py_spy() -> str:
    beside_python = Path(sys.executable).parent / "py-spy"
    found = shutil.which("py-spy") or (str(beside_python) if beside_python.exists() else None)
    if not found:
        raise ProfilerMissing("--profile needs py-spy (pip install py-spy)")
    return found


class ServerProfile:
    """py-spy recording one process for a fixed time into a collapsed-stack file."""

    def __init__(self, pid: int, seconds: float, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            find_py_spy(),
            "record",
            "-p",
            str(pid),
            "-d",
            str(max(1, round(seconds))),
            "-r",
            "200",
            "-f",
            "raw",
            "--nolineno",
            "-o",
            str(path),
        ]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def finish(self, timeout_s: float = 60) -> str:
        """Wait for py-spy and return a summary of the profile (or why there is none)."""
        try:
            _, err = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if not self.path.exists():
            return f"no profile written: {err.strip()[-300:]}"
        return summarize(self.path.read_text(encoding="utf-8"))


def _frame_name(frame: str) -> str:
    """'step (server/scheduler.py)' -> 'step (scheduler.py)'."""
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.rstrip(')')).name})" if where else name


def summarize(collapsed: str, top: int = 14) -> str:
    """Share of samples by innermost frame (self) and by frame anywhere on the stack (total)."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_name(f) for f in stack.split(";")[1:]]  # the first entry names the process
        if not frames:
            continue
        samples += n
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
    if not samples:
        return "profile is empty"
    lines = [f"{samples} samples of active threads; innermost frames (self):"]
    lines += [f"  {100 * n / samples:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines.append("frames anywhere on the stack (total):")
    lines += [f"  {100 * n / samples:5.1f}%  {f}" for f, n in total.most_common(top)]
    return "\n".join(lines)

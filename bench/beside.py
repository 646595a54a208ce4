"""Baselines run right after the server's workload they are compared with.

The systems of a run are measured in blocks, one system after another, minutes apart; on a shared
machine whose speed drifts by tens of percent over minutes, a ratio of two blocks says as much
about the drift as about the systems. So, inside the server's block, right after each workload a
target judges, each of that target's baselines runs the same workload once (the server idle
meanwhile), recorded as system "<baseline>-beside"; the targets are judged on those pairs
(report.evaluate). Which baselines follow which workload: ``BenchConfig.beside_plan``. A served
baseline is started at its first such run and stopped with the server's block, idle in between.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .procs import LoadGenerators, ServingProcess

if TYPE_CHECKING:
    from .runner import Runner


def raw_item(workload: str) -> dict:
    """The raw loop's plan item for a server workload (packed-N: N rows stepping, as stream-N)."""
    kind, _, size = workload.rpartition("-")
    if kind == "prefill":
        return {"kind": "prefill", "tokens": int(size)}
    return {"kind": "generate" if kind == "generate" else "stream", "batch": int(size)}


class Beside:
    """One server block's baseline runs (``beside_plan``) and the served baselines they started."""

    def __init__(self, runner: Runner, repeat: int, plan: dict[str, list[str]]):
        self.runner = runner
        self.repeat = repeat
        self.plan = plan
        self.started: dict[str, tuple[ServingProcess, LoadGenerators]] = {}

    def after(self, workload: str, job: dict, sessions: int) -> None:
        """The server just ran ``workload``: its baselines run it now."""
        runner = self.runner
        for system in self.plan.get(workload, []):
            label = f"{system}-beside"
            if system == "raw":
                runner.raw([raw_item(workload)], self.repeat, label)
                continue
            proc, lgs = self._system(system)
            if system == "metrics":
                runner.scraped_load(proc, lgs, label, workload, self.repeat, job, sessions)
            else:
                runner.load(proc, lgs, label, workload, self.repeat, job, sessions)

    def _system(self, system: str) -> tuple[ServingProcess, LoadGenerators]:
        if system not in self.started:
            proc = self.runner.start(system)
            try:
                self.started[system] = proc, LoadGenerators(proc.address, self.runner.cfg.client_procs)
            except BaseException:
                proc.stop()
                raise
        return self.started[system]

    def close(self) -> None:
        started, self.started = list(self.started.values()), {}
        for proc, lgs in started:
            try:
                lgs.close()
            finally:
                proc.stop()

"""Runs every measurement of a benchmark, one system at a time.

Per repeat, each system (server, naive server, echo, inline floor, raw ONNX Runtime) is started
fresh, runs all of its workloads, and is stopped before the next one starts, so that on a small
machine no two of them compete for the cores. Repeats interleave the systems, so slow drifts in
the machine's load hit all of them alike.

A target's two sides measured in different blocks are minutes apart, and the machine's speed
drifts by tens of percent over minutes; so right after each server workload a target judges, its
baseline runs that same workload once more, the server idle meanwhile (systems named
"<system>-beside": ``beside.Beside``, ``BenchConfig.beside_plan``): those back-to-back pairs are
what the targets are judged on.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .beside import Beside
from .config import BenchConfig
from .memory import MemoryResult, measure_memory
from .model_choice import ChosenModel
from .procs import BenchProcessError, LoadGenerators, ServingProcess, free_port, machine_busy_seconds, run_raw_loop
from .profile import ServerProfile
from .scrape import Scraper
from .stats import percentile

Log = Callable[[str], None]


@dataclass
class Measurement:
    """One workload on one system in one repeat."""

    target: str  # server | naive | echo | floor | raw | metrics, or one of those + "-beside"
    workload: str  # e.g. "stream-256", "generate-1", "prefill-256"
    repeat: int
    tokens_per_s: float
    p50_ms: float
    p99_ms: float
    extra: dict = field(default_factory=dict)  # errors, CPU use, reply size, ...


class Runner:
    """Carries one run's configuration and collects its measurements."""

    def __init__(self, cfg: BenchConfig, model: ChosenModel, log: Log, out_dir: Path):
        self.cfg = cfg
        self.model = model
        self.log = log
        self.out_dir = out_dir  # where profiles go
        self.profiles: dict[str, str] = {}  # "target/workload" -> summary
        self.measurements: list[Measurement] = []
        self.memory: list[MemoryResult] = []
        self.metrics_port = 0  # of the "metrics" system while it runs

    # ---- systems ----------------------------------------------------------------------------
    def _server_argv(self, batching: bool, extra: Sequence[str] = ()) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "seqserve",
            "serve",
            "--models",
            str(self.model.serve_root),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--device",
            self.cfg.device,
        ]
        if not batching:
            argv += ["--batching", "off"]
        return argv + list(self.cfg.server_args) + list(extra)

    def start(self, target: str, extra: Sequence[str] = ()) -> ServingProcess:
        if target == "echo":
            width = str(self.model.bundle.manifest.output_size)
            return ServingProcess(
                [sys.executable, "-m", "seqserve.bench.echo", "--port", "0", "--width", width], "echo server"
            )
        if target == "floor":
            return ServingProcess(
                [
                    sys.executable,
                    "-m",
                    "seqserve.bench.echo",
                    "--port",
                    "0",
                    "--bundle",
                    str(self.model.bundle.path),
                    "--device",
                    self.cfg.device,
                ],
                "echo with the model inline",
            )
        if target == "metrics":
            self.metrics_port = free_port()
            extra = [*extra, "--metrics-port", str(self.metrics_port)]
            return ServingProcess(self._server_argv(True, extra), "seqserve serve --metrics-port")
        name = "seqserve serve" + ("" if target == "server" else " --batching off")
        return ServingProcess(self._server_argv(target == "server", extra), name)

    # ---- workloads --------------------------------------------------------------------------
    def jobs(self, lgs: LoadGenerators, job: dict, sessions: int) -> list[dict | None]:
        """``job`` for each load generator with its share of the sessions (None: that one sits out).
        An "sdk" job runs in one process: all its sessions go through one SDK stream."""
        procs = 1 if job.get("kind") == "sdk" else min(len(lgs.procs), sessions)
        counts = [sessions // procs + (1 if i < sessions % procs else 0) for i in range(procs)]
        return [dict(job, sessions=counts[i]) if i < procs else None for i in range(len(lgs.procs))]

    def load(
        self,
        server: ServingProcess,
        lgs: LoadGenerators,
        target: str,
        workload: str,
        repeat: int,
        job: dict,
        sessions: int,
        side: bool = False,
    ) -> Measurement:
        jobs = self.jobs(lgs, job, sessions)
        if side:  # the job's side load (e.g. a long-prompt session) runs in the first process only
            jobs = [
                j if i == 0 or j is None else {k: v for k, v in j.items() if k != "long_prompt"}
                for i, j in enumerate(jobs)
            ]
        cpu0, busy0, t0 = server.cpu_seconds(), machine_busy_seconds(), time.monotonic()
        answers = lgs.run(jobs, self.cfg.warmup_s, self.cfg.duration_s)
        wall = time.monotonic() - t0
        server_cores = (server.cpu_seconds() - cpu0) / wall
        client_cores = sum(a["client_cpu_s"] for a in answers) / wall
        other_cores = max(0.0, (machine_busy_seconds() - busy0) / wall - server_cores - client_cores)
        server.check_alive()
        latencies = [x for a in answers for x in a["latencies_ms"]]
        tokens = sum(a["tokens"] for a in answers)
        errors = sum(a["errors"] for a in answers)
        first_error = next((a["first_error"] for a in answers if a["first_error"]), "")
        replies = [a["reply_bytes"] for a in answers if a["reply_bytes"]]
        m = Measurement(
            target,
            workload,
            repeat,
            tokens / self.cfg.duration_s,
            percentile(latencies, 50),
            percentile(latencies, 99),
            {
                "messages": sum(a["results"] for a in answers),
                "errors": errors,
                "first_error": first_error,
                "server_cores": round(server_cores, 3),
                "client_cores": round(client_cores, 3),
                "other_cores": round(other_cores, 3),
                "reply_bytes": round(sum(replies) / len(replies), 1) if replies else 0,
            },
        )
        if side:
            m.extra["side_tok_s"] = round(sum(a.get("side_tokens", 0) for a in answers) / self.cfg.duration_s, 1)
        self._record(m)
        return m

    def scraped_load(
        self, server: ServingProcess, lgs: LoadGenerators, target: str, workload: str, repeat: int, job: dict, n: int
    ) -> None:
        """``load`` with the server's /metrics scraped once a second meanwhile (the "metrics" system)."""
        scraper = Scraper(f"http://127.0.0.1:{self.metrics_port}/metrics")
        try:
            m = self.load(server, lgs, target, workload, repeat, job, n)
        finally:
            scraper.stop()
        if scraper.errors or not scraper.durations_ms:
            raise BenchProcessError(f"scraping /metrics failed: {scraper.errors[:1] or 'no scrape'}")
        m.extra.update(scrapes=len(scraper.durations_ms), scrape_ms=round(percentile(scraper.durations_ms, 50), 2))
        m.extra["scrape_bytes"] = scraper.sizes[-1]

    def _record(self, m: Measurement) -> None:
        self.measurements.append(m)
        warn = f"  !! {m.extra['errors']} errors, first: {m.extra['first_error']}" if m.extra.get("errors") else ""
        cores = f"  server {m.extra['server_cores']:.2f} cores" if "server_cores" in m.extra else ""
        if "side_tok_s" in m.extra:
            cores += f"  long prompt fed at {m.extra['side_tok_s']:,.0f} tok/s"
        if m.extra.get("other_cores", 0) > 0.25:
            cores += f"  (other processes used {m.extra['other_cores']:.1f} cores)"
        self.log(
            f"  {m.target:<14} {m.workload:<17} {m.tokens_per_s:>10,.0f} tok/s   "
            f"p50 {m.p50_ms:8.3f} ms   p99 {m.p99_ms:8.3f} ms{cores}{warn}"
        )

    def _served_workloads(self, target: str, repeat: int) -> None:
        """All client-driven workloads against one freshly started system (for the server, each
        judged one followed by its baselines' runs of it: ``Beside``)."""
        cfg, name = self.cfg, self.model.name
        vocab = self.model.bundle.manifest.input_dim
        server = self.start(target)
        lgs = LoadGenerators(server.address, cfg.client_procs)
        beside = Beside(self, repeat, cfg.beside_plan()) if target == "server" else None

        def measure(workload: str, job: dict, sessions: int, side: bool = False) -> None:
            self.load(server, lgs, target, workload, repeat, job, sessions, side)
            if beside is not None:
                beside.after(workload, job, sessions)

        try:
            stream = dict(
                cmd="prepare",
                kind="stream",
                model=name,
                vocab=vocab,
                top_k=cfg.top_k,
                streams=cfg.streams_per_proc,
                tokens=1,
            )
            if target == "floor":  # a latency floor for one session, nothing more
                n = min(cfg.stream_sessions)
                self.load(server, lgs, target, f"stream-{n}", repeat, stream, n)
                return
            if target == "metrics":  # what metrics cost: the biggest streaming workload, scraped meanwhile
                n = max(cfg.stream_sessions)
                self.scraped_load(server, lgs, target, f"stream-{n}", repeat, stream, n)
                return
            for n in cfg.stream_sessions:
                measure(f"stream-{n}", stream, n)
            if target == "server":  # the same closed loops over the KServe v2 / Triton API
                for n in cfg.kserve_sessions:
                    measure(f"kserve-stream-{n}", dict(stream, kind="kserve"), n)
                if cfg.long_prompt_tokens:  # streaming while one more session feeds long prompts
                    n = cfg.long_prompt_sessions
                    measure(f"longprompt-{n}", dict(stream, long_prompt=cfg.long_prompt_tokens), n, side=True)
                for n in cfg.packed_sessions:  # a gateway: all sessions through one SDK stream
                    sdk = dict(stream, kind="sdk")
                    measure(f"sdk-stream-{n}", dict(sdk, packed=False), n)
                    measure(f"packed-{n}", dict(sdk, packed=True), n)
            gen = dict(
                cmd="prepare",
                kind="generate",
                model=name,
                vocab=vocab,
                max_tokens=cfg.generate_max_tokens,
                tokens_per_message=cfg.generate_tokens_per_message,
            )
            if target != "echo":  # the echo has no model to generate with
                for n in cfg.generate_sessions:
                    measure(f"generate-{n}", gen, n)
            prefill = dict(stream, tokens=cfg.prefill_tokens, streams=1)
            measure(f"prefill-{cfg.prefill_tokens}", prefill, 1)
            kind, _, size = cfg.profile.rpartition("-")
            sdk = dict(stream, kind="sdk")
            jobs = {"stream": stream, "generate": gen, "prefill": prefill}
            if target == "server":  # the workloads only the server runs
                jobs.update({"packed": dict(sdk, packed=True), "sdk-stream": dict(sdk, packed=False)})
                jobs["kserve-stream"] = dict(stream, kind="kserve")
            if target == "echo":
                del jobs["generate"]  # the echo has no model to generate with
            if repeat == 0 and kind in jobs:  # (longprompt-N is not profiled: it needs its side session)
                self._profile(server, lgs, target, cfg.profile, jobs[kind], 1 if kind == "prefill" else int(size))
        finally:
            if beside is not None:
                beside.close()
            lgs.close()
            server.stop()

    def _profile(
        self, server: ServingProcess, lgs: LoadGenerators, target: str, workload: str, job: dict, sessions: int
    ) -> None:
        """An extra, unrecorded run of one workload with py-spy sampling the serving process."""
        path = self.out_dir / f"profile-{target}-{workload}.txt"
        seconds = self.cfg.warmup_s + self.cfg.duration_s
        profiler: list[ServerProfile] = []
        jobs = self.jobs(lgs, job, sessions)
        lgs.run(
            jobs,
            self.cfg.warmup_s,
            self.cfg.duration_s,
            on_go=lambda: profiler.append(ServerProfile(server.pid, seconds, path)),
        )
        summary = profiler[0].finish()
        self.profiles[f"{target}/{workload}"] = summary
        self.log(f"  profile of {target} during {workload} (extra run, not counted; {path}):\n{summary}")

    def _raw_workloads(self, repeat: int) -> None:
        cfg = self.cfg
        plan = (
            [{"kind": "stream", "batch": n} for n in cfg.raw_batches()]
            + [{"kind": "generate", "batch": n} for n in cfg.generate_sessions]
            + [{"kind": "prefill", "tokens": cfg.prefill_tokens}]
        )
        self.raw(plan, repeat, "raw")

    def raw(self, plan: list[dict], repeat: int, system: str) -> None:
        cfg = self.cfg
        items, other_cores = run_raw_loop(self.model.bundle.path, plan, cfg.warmup_s, cfg.duration_s, cfg.device)
        for item in items:
            size = item.get("batch", item.get("tokens"))
            self._record(
                Measurement(
                    system,
                    f"{item['kind']}-{size}",
                    repeat,
                    item["tokens_per_s"],
                    item["p50_ms"],
                    item["p99_ms"],
                    {"calls": item["calls"], "other_cores": round(other_cores, 3)},
                )
            )

    # ---- the run ----------------------------------------------------------------------------
    def run(self) -> None:
        cfg = self.cfg
        for repeat in range(cfg.repeats):
            for target in cfg.blocks():
                self.log(f"[repeat {repeat + 1}/{cfg.repeats}] {target}")
                if target == "raw":
                    self._raw_workloads(repeat)
                else:
                    self._served_workloads(target, repeat)
            if "memory" in cfg.targets and cfg.idle_sessions and repeat < cfg.memory_repeats:
                self.log(f"[repeat {repeat + 1}/{cfg.repeats}] memory with {cfg.idle_sessions:,} idle sessions")
                self.memory.append(measure_memory(self, repeat))

    def as_dict(self) -> dict:
        return {
            "measurements": [asdict(m) for m in self.measurements],
            "profiles": self.profiles,
            "memory": [
                dict(asdict(m), ratio_created=m.ratio(m.rss_created), ratio_touched=m.ratio(m.rss_touched))
                for m in self.memory
            ],
        }

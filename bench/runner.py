"""Runs every measurement of a benchmark, one system at a time.

Per repeat, each system (server, naive server, echo, inline floor, raw ONNX Runtime) is started
fresh, runs all of its workloads, and is stopped before the next one starts, so that on a small machine no two of
them compete for the cores. Repeats interleave the systems, so slow drifts in the machine's load
hit all of them alike and ratios within one repeat stay comparable. The two ratios most exposed to
drift (packed, one generating session) get a raw-loop run right after the server's workload.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import BenchConfig
from .model_choice import ChosenModel
from .procs import BenchProcessError, LoadGenerators, ServingProcess, free_port, machine_busy_seconds, run_raw_loop
from .profile import ServerProfile
from .scrape import Scraper
from .stats import percentile

Log = Callable[[str], None]


@dataclass
class Measurement:
    """One workload on one system in one repeat."""

    target: str  # server | naive | echo | floor | raw
    workload: str  # e.g. "stream-256", "generate-1", "prefill-256"
    repeat: int
    tokens_per_s: float
    p50_ms: float
    p99_ms: float
    extra: dict = field(default_factory=dict)  # errors, CPU use, reply size, ...


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

    def _start(self, target: str, extra: Sequence[str] = ()) -> ServingProcess:
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
    def _jobs(self, lgs: LoadGenerators, job: dict, sessions: int) -> list[dict | None]:
        """``job`` for each load generator with its share of the sessions (None: that one sits out).
        An "sdk" job runs in one process: all its sessions go through one SDK stream."""
        procs = 1 if job.get("kind") == "sdk" else min(len(lgs.procs), sessions)
        counts = [sessions // procs + (1 if i < sessions % procs else 0) for i in range(procs)]
        return [dict(job, sessions=counts[i]) if i < procs else None for i in range(len(lgs.procs))]

    def _load(
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
        jobs = self._jobs(lgs, job, sessions)
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
        self._record(m)
        return m

    def _record(self, m: Measurement) -> None:
        self.measurements.append(m)
        warn = f"  !! {m.extra['errors']} errors, first: {m.extra['first_error']}" if m.extra.get("errors") else ""
        cores = f"  server {m.extra['server_cores']:.2f} cores" if "server_cores" in m.extra else ""
        if m.extra.get("other_cores", 0) > 0.25:
            cores += f"  (other processes used {m.extra['other_cores']:.1f} cores)"
        self.log(
            f"  {m.target:<6} {m.workload:<17} {m.tokens_per_s:>10,.0f} tok/s   "
            f"p50 {m.p50_ms:8.3f} ms   p99 {m.p99_ms:8.3f} ms{cores}{warn}"
        )

    def _served_workloads(self, target: str, repeat: int) -> None:
        """All client-driven workloads against one freshly started system."""
        cfg, name = self.cfg, self.model.name
        vocab = self.model.bundle.manifest.input_dim
        server = self._start(target)
        lgs = LoadGenerators(server.address, cfg.client_procs)
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
                self._load(server, lgs, target, f"stream-{n}", repeat, stream, n)
                return
            if target == "metrics":  # what metrics cost: the biggest streaming workload, scraped meanwhile
                n = max(cfg.stream_sessions)
                scraper = Scraper(f"http://127.0.0.1:{self.metrics_port}/metrics")
                try:
                    m = self._load(server, lgs, target, f"stream-{n}", repeat, stream, n)
                finally:
                    scraper.stop()
                if scraper.errors or not scraper.durations_ms:
                    raise BenchProcessError(f"scraping /metrics failed: {scraper.errors[:1] or 'no scrape'}")
                m.extra.update(
                    scrapes=len(scraper.durations_ms), scrape_ms=round(percentile(scraper.durations_ms, 50), 2)
                )
                m.extra["scrape_bytes"] = scraper.sizes[-1]
                return
            for n in cfg.stream_sessions:
                self._load(server, lgs, target, f"stream-{n}", repeat, stream, n)
            if target == "server":  # the same closed loops over the KServe v2 / Triton API
                for n in cfg.kserve_sessions:
                    self._load(server, lgs, target, f"kserve-stream-{n}", repeat, dict(stream, kind="kserve"), n)
                if cfg.long_prompt_tokens:  # streaming while one more session feeds long prompts
                    n = cfg.long_prompt_sessions
                    job = dict(stream, long_prompt=cfg.long_prompt_tokens)
                    self._load(server, lgs, target, f"longprompt-{n}", repeat, job, n, side=True)
                for n in cfg.packed_sessions:  # a gateway: all sessions through one SDK stream
                    sdk = dict(stream, kind="sdk")
                    self._load(server, lgs, target, f"sdk-stream-{n}", repeat, dict(sdk, packed=False), n)
                    self._load(server, lgs, target, f"packed-{n}", repeat, dict(sdk, packed=True), n)
                    self._raw_beside(repeat, {"kind": "stream", "batch": n})
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
                    self._load(server, lgs, target, f"generate-{n}", repeat, gen, n)
                    if target == "server" and n == 1:  # one session: the ratio most at the mercy of drift
                        self._raw_beside(repeat, {"kind": "generate", "batch": 1})
            prefill = dict(stream, tokens=cfg.prefill_tokens, streams=1)
            self._load(server, lgs, target, f"prefill-{cfg.prefill_tokens}", repeat, prefill, 1)
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
            lgs.close()
            server.stop()

    def _profile(
        self, server: ServingProcess, lgs: LoadGenerators, target: str, workload: str, job: dict, sessions: int
    ) -> None:
        """An extra, unrecorded run of one workload with py-spy sampling the serving process."""
        path = self.out_dir / f"profile-{target}-{workload}.txt"
        seconds = self.cfg.warmup_s + self.cfg.duration_s
        profiler: list[ServerProfile] = []
        jobs = self._jobs(lgs, job, sessions)
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
        self._raw(plan, repeat, "raw")

    def _raw_beside(self, repeat: int, item: dict) -> None:
        """The raw loop's run of one workload right after the server's (the server idle), as system
        "raw-beside": a baseline the machine's drift between the two blocks cannot blur."""
        if "raw" in self.cfg.targets:
            self._raw([item], repeat, "raw-beside")

    def _raw(self, plan: list[dict], repeat: int, system: str) -> None:
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

    def _memory(self, repeat: int) -> None:
        """Server RSS growth from idle sessions, against the raw bytes of their state."""
        cfg, name = self.cfg, self.model.name
        server = self._start("server", self._memory_flags())
        lgs = LoadGenerators(server.address, cfg.client_procs)
        try:
            first = [{"cmd": "create", "model": name, "count": 1}] + [None] * (len(lgs.procs) - 1)
            lgs.each(first)
            lgs.each([{"cmd": "touch"}] + [None] * (len(lgs.procs) - 1))
            time.sleep(0.5)
            before = server.rss_bytes()
            shares = self._jobs(lgs, {}, cfg.idle_sessions)
            t0 = time.monotonic()
            lgs.each(
                [
                    {"cmd": "create", "model": name, "count": j["sessions"], "concurrency": 64} if j else None
                    for j in shares
                ]
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
                self.log(f"  !! {errors} steps failed while touching idle sessions: {touched[0]['first_error']}")
        finally:
            lgs.close()
            server.stop()
        result = MemoryResult(
            repeat,
            cfg.idle_sessions,
            self.model.bundle.manifest.state_bytes_per_session(),
            before,
            created,
            after_touch,
            create_s,
            touch_s,
        )
        self.memory.append(result)
        self.log(
            f"  memory: {cfg.idle_sessions:,} sessions created in {create_s:.1f} s: "
            f"RSS +{(created - before) / 2**20:,.1f} MiB "
            f"({result.ratio(created):.2f}x their {result.raw_state_bytes / 2**20:,.1f} MiB of state); "
            f"after one step each ({touch_s:.1f} s): +{(after_touch - before) / 2**20:,.1f} MiB "
            f"({result.ratio(after_touch):.2f}x)"
        )

    def _memory_flags(self) -> list[str]:
        """Server flags so that the idle sessions all fit and none expires during the measurement."""
        room = str(self.cfg.idle_sessions + 1000)
        return ["--max-sessions", room, "--max-sessions-per-model", room, "--idle-ttl-s", "0"]

    # ---- the run ----------------------------------------------------------------------------
    def run(self) -> None:
        cfg = self.cfg
        for repeat in range(cfg.repeats):
            for target in cfg.targets:
                if target == "memory":
                    continue
                self.log(f"[repeat {repeat + 1}/{cfg.repeats}] {target}")
                if target == "raw":
                    self._raw_workloads(repeat)
                else:
                    self._served_workloads(target, repeat)
            if "memory" in cfg.targets and cfg.idle_sessions and repeat < cfg.memory_repeats:
                self.log(f"[repeat {repeat + 1}/{cfg.repeats}] memory with {cfg.idle_sessions:,} idle sessions")
                self._memory(repeat)

    def as_dict(self) -> dict:
        return {
            "measurements": [asdict(m) for m in self.measurements],
            "profiles": self.profiles,
            "memory": [
                dict(asdict(m), ratio_created=m.ratio(m.rss_created), ratio_touched=m.ratio(m.rss_touched))
                for m in self.memory
            ],
        }

"""What one benchmark run measures, and how long each measurement lasts."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# Everything the benchmark can measure. "server" and "naive" are the real server (with and
# without batching); "metrics" is the server with its /metrics endpoint on and scraped, for the
# biggest streaming workload only (its cost against "server", which runs with metrics off);
# "echo" and "raw" are the transport and compute ceilings; "floor" is the echo running the model
# inline for each step (one session's latency floor); "memory" is the server's memory with many
# idle sessions.
TARGETS = ("server", "metrics", "naive", "echo", "floor", "raw", "memory")


@dataclass
class BenchConfig:
    """Settings of one benchmark run; ``quick()`` gives the smoke-test sized variant."""

    repeats: int = 3  # each measurement is repeated and the median reported: single runs are noisy on 2 cores
    duration_s: float = 4.0  # measured window per measurement: long enough for ~10k steps at 256 sessions
    warmup_s: float = 1.0  # traffic before the window opens, so batches and caches reach a steady state
    # closed-loop sessions per streaming measurement
    stream_sessions: list[int] = field(default_factory=lambda: [1, 16, 64, 256])
    # closed-loop sequences over the KServe v2 / Triton API (ModelStreamInfer), measured on the server
    # next to its native stream of the same size; empty: not measured
    kserve_sessions: list[int] = field(default_factory=lambda: [256])
    # sessions stepping through ONE SDK stream (a gateway's), packed and one step per message, on
    # the server; the raw loop also runs batches of these sizes. Empty: not measured
    packed_sessions: list[int] = field(default_factory=lambda: [256])
    # streaming sessions measured while one more session feeds long prompts (longprompt-N), against
    # the same count streaming alone (stream-N, which must be measured too); 0 tokens: not measured
    long_prompt_sessions: int = 64
    long_prompt_tokens: int = 8192
    generate_sessions: list[int] = field(default_factory=lambda: [1, 256])  # concurrent Generate calls per measurement
    generate_max_tokens: int = 128  # tokens per Generate call; sessions call again when one finishes
    generate_tokens_per_message: int = 0  # GenerateRequest.tokens_per_message; 0 leaves it to the server
    prefill_tokens: int = 256  # prompt length for the prefill latency measurement
    idle_sessions: int = 100_000  # sessions created for the memory measurement
    memory_repeats: int = 1  # the memory figure barely varies between runs and takes the longest to set up
    client_procs: int = 2  # load-generating processes; sessions are split evenly between them
    streams_per_proc: int = 4  # StepStream calls per process; sessions are multiplexed over them by tag
    top_k: int = 5  # what each streaming step asks for (the SDK's default output)
    # where the server, the naive server and the raw loop run the model: cpu, or cuda (onnxruntime-gpu)
    device: str = "cpu"
    server_args: list[str] = field(default_factory=list)  # extra flags passed to `seqserve serve`
    targets: tuple[str, ...] = TARGETS  # which systems to measure
    # workload (e.g. "stream-256") to profile with py-spy: one extra run per served system, first repeat
    profile: str = ""
    quick: bool = False  # smoke-test mode: tiny everything

    @classmethod
    def quick_config(cls) -> "BenchConfig":
        """A run that exercises every code path in well under a minute (numbers are meaningless)."""
        return cls(
            repeats=1,
            duration_s=0.5,
            warmup_s=0.2,
            stream_sessions=[1, 4],
            kserve_sessions=[4],
            packed_sessions=[4],
            long_prompt_sessions=4,
            long_prompt_tokens=256,
            generate_sessions=[1, 4],
            generate_max_tokens=16,
            prefill_tokens=32,
            idle_sessions=300,
            client_procs=2,
            streams_per_proc=2,
            quick=True,
        )

    def with_overrides(self, **changes) -> "BenchConfig":
        """A copy with the given fields changed (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def server_workloads(self) -> list[str]:
        """Names of the workloads the server runs, e.g. "stream-256", "generate-1", "prefill-256"."""
        return (
            [f"stream-{n}" for n in self.stream_sessions]
            + [f"packed-{n}" for n in self.packed_sessions]
            + [f"sdk-stream-{n}" for n in self.packed_sessions]
            + ([f"longprompt-{self.long_prompt_sessions}"] if self.long_prompt_tokens else [])
            + [f"generate-{n}" for n in self.generate_sessions]
            + [f"prefill-{self.prefill_tokens}"]
        )

    def raw_batches(self) -> list[int]:
        """Batch sizes the raw loop steps: every streaming and packed session count."""
        return sorted(set(self.stream_sessions) | set(self.packed_sessions))

    def beside_plan(self) -> dict[str, list[str]]:
        """Server workload -> the baselines (those among the targets) that run it again right after
        the server (bench/beside.py): every pair a target compares. The single-session latency
        target, a sum of three systems' p50s, is left to the blocks. Empty without the server."""
        if "server" not in self.targets:
            return {}
        big, gen_big = max(self.stream_sessions), max(self.generate_sessions)
        plan: dict[str, list[str]] = {f"stream-{big}": ["echo", "naive", "metrics"]}
        plan.update({f"packed-{n}": ["raw"] for n in self.packed_sessions})  # against the raw loop at n rows
        plan[f"generate-{gen_big}"] = ["raw"]
        if 1 in self.generate_sessions and gen_big != 1:  # one session's own two targets (report.evaluate)
            plan["generate-1"] = ["raw", "naive"]
        plan[f"prefill-{self.prefill_tokens}"] = ["raw"]
        return {w: [b for b in systems if b in self.targets] for w, systems in plan.items()}

    def blocks(self) -> list[str]:
        """The systems measured in blocks of their own: all targets but memory, and but metrics when
        it runs beside the server (its one workload is the server's biggest stream)."""
        beside = {b for systems in self.beside_plan().values() for b in systems}
        return [t for t in self.targets if t != "memory" and not (t == "metrics" and t in beside)]

    def estimated_seconds(self) -> float:
        """Rough wall time of the run: measurement windows plus per-measurement and start-up overheads
        (the overheads as full runs on a 2-core machine took them: docs/bench.md, "Method")."""
        per = self.warmup_s + self.duration_s + 0.25
        systems = self.blocks()
        count = sum(self._workload_count(t) for t in systems)
        beside = self.beside_plan()
        # starting a server or the raw process, loading the model: each block, each raw run beside
        # the server, and each served baseline beside it once
        served = {b for systems in beside.values() for b in systems if b != "raw"}
        raw_runs = sum(systems.count("raw") for systems in beside.values())
        starts = 1.0 * (len(systems) + raw_runs + len(served))
        memory = 0.0
        if "memory" in self.targets:  # creating the sessions, then stepping each of them once
            memory = (3.0 + self.idle_sessions / 2800.0 + self.idle_sessions / 6700.0) * min(
                self.memory_repeats, self.repeats
            )
        return self.repeats * (count * per + starts) + memory

    def _workload_count(self, target: str) -> int:
        if target in ("floor", "metrics"):
            return 1  # one streaming workload, nothing else
        generate = len(self.generate_sessions) if target != "echo" else 0  # the echo has no model
        kserve = len(self.kserve_sessions) if target == "server" else 0
        packed = 2 * len(self.packed_sessions) if target == "server" else 0  # packed and one step per message
        long = 1 if target == "server" and self.long_prompt_tokens else 0
        beside = sum(len(b) for b in self.beside_plan().values()) if target == "server" else 0
        return len(self.stream_sessions) + kserve + packed + long + generate + beside + 1  # + the prefill

    def validate(self) -> None:
        """Raise ValueError naming the first setting that cannot work."""
        if self.repeats < 1:
            raise ValueError(f"--repeats must be at least 1, got {self.repeats}")
        if self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError("--duration must be positive and --warmup not negative")
        if self.client_procs < 1 or self.streams_per_proc < 1:
            raise ValueError("--client-procs and --streams must be at least 1")
        if any(
            n < 1 for n in self.stream_sessions + self.generate_sessions + self.kserve_sessions + self.packed_sessions
        ):
            raise ValueError("session counts must be at least 1")
        if self.long_prompt_tokens < 0 or self.long_prompt_sessions < 1:
            raise ValueError("--long-prompt-tokens must not be negative and --long-prompt-sessions at least 1")
        if self.prefill_tokens < 1 or self.idle_sessions < 0:
            raise ValueError("--prefill-tokens must be at least 1 and --idle-sessions not negative")
        if self.profile and self.profile not in self.server_workloads():
            raise ValueError(
                f"--profile {self.profile!r} is not a workload of this run; "
                f"choose from {', '.join(self.server_workloads())}"
            )
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and "memory" in self.targets:
            raise ValueError(
                "the memory measurement reads host memory, but with --device cuda the state lives on "
                "the GPU: leave 'memory' out of --targets"
            )
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"unknown target(s) {unknown}; choose from {', '.join(TARGETS)}")

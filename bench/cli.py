"""``seqserve bench``: measure the server against a naive server and the transport/compute ceilings."""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from seqserve.bundle import BundleError
from seqserve.cli import CommandError

from .config import TARGETS, BenchConfig
from .model_choice import choose_model
from .procs import BenchProcessError
from .profile import ProfilerMissing, find_py_spy
from .report import (
    VERDICT_HEADER,
    WORKLOAD_HEADER,
    evaluate,
    markdown_table,
    summarize,
    text_table,
    verdict_rows,
    workload_rows,
)
from .runner import Runner

DEFAULT_OUT = Path("bench") / "results"


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CommandError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser) -> None:
    parser.add_argument(
        "--model-dir",
        type=Path,
        help="models folder (default: models/; without a language model "
        "there, a random-weight 2x512 LSTM is exported to a temporary folder)",
    )
    parser.add_argument(
        "--model", help="model name in the models folder (default: docs-lstm, else the most recent token LM)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default: {DEFAULT_OUT}/)")
    parser.add_argument("--repeats", type=int, help="repeats per measurement; medians are reported (default 3)")
    parser.add_argument("--duration", type=float, help="measured seconds per measurement (default 4)")
    parser.add_argument("--warmup", type=float, help="seconds of traffic before each window opens (default 1)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: tiny random model, 1 repeat, short windows, few sessions"
    )
    parser.add_argument("--targets", help=f"comma-separated systems to measure (default: {','.join(TARGETS)})")
    parser.add_argument("--stream-sessions", help="streaming session counts (default 1,16,64,256)")
    parser.add_argument(
        "--kserve-sessions",
        help="sequence counts streamed over the KServe v2 / Triton API on the server (default 256; 0 skips)",
    )
    parser.add_argument(
        "--packed-sessions",
        help="sessions stepping through one SDK stream, packed and one step per message, on the server "
        "(default 256; 0 skips)",
    )
    parser.add_argument(
        "--long-prompt-tokens",
        type=int,
        help="prompt length one extra session feeds over and over during longprompt-N (default 8192; 0 skips)",
    )
    parser.add_argument(
        "--long-prompt-sessions",
        type=int,
        help="streaming sessions measured during longprompt-N, against stream-N (default 64)",
    )
    parser.add_argument("--generate-sessions", help="generating session counts (default 1,256)")
    parser.add_argument(
        "--tokens-per-message",
        type=int,
        help="tokens per Generate message the client asks for (default 0: the server's choice)",
    )
    parser.add_argument("--prefill-tokens", type=int, help="prompt length of the prefill measurement (default 256)")
    parser.add_argument(
        "--idle-sessions", type=int, help="sessions for the memory measurement, 0 to skip (default 100000)"
    )
    parser.add_argument("--client-procs", type=int, help="load-generating processes (default 2)")
    parser.add_argument("--streams", type=int, help="StepStream calls per load-generating process (default 4)")
    parser.add_argument(
        "--profile",
        metavar="WORKLOAD",
        help="in the first repeat, run this workload (e.g. "
        "stream-256) once more on each served system with py-spy sampling it; needs py-spy",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="where the model runs for the server, the naive server and the raw loop (default cpu; "
        "cuda needs onnxruntime-gpu and leaves out the memory measurement)",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra flag for `seqserve serve` (repeatable, e.g. --server-arg=--max-batch=128)",
    )


def _config(args) -> BenchConfig:
    base = BenchConfig.quick_config() if args.quick else BenchConfig()
    cfg = base.with_overrides(
        repeats=args.repeats,
        duration_s=args.duration,
        warmup_s=args.warmup,
        stream_sessions=_int_list(args.stream_sessions) if args.stream_sessions else None,
        generate_sessions=_int_list(args.generate_sessions) if args.generate_sessions else None,
        kserve_sessions=[n for n in _int_list(args.kserve_sessions) if n] if args.kserve_sessions else None,
        packed_sessions=[n for n in _int_list(args.packed_sessions) if n] if args.packed_sessions else None,
        long_prompt_tokens=args.long_prompt_tokens,
        long_prompt_sessions=args.long_prompt_sessions,
        prefill_tokens=args.prefill_tokens,
        generate_tokens_per_message=args.tokens_per_message,
        idle_sessions=args.idle_sessions,
        client_procs=args.client_procs,
        streams_per_proc=args.streams,
        server_args=args.server_arg or None,
        profile=args.profile,
        device=args.device,
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip())
        if args.targets
        else (tuple(t for t in TARGETS if t != "memory") if args.device == "cuda" else None),
    )
    try:
        cfg.validate()
        if cfg.profile:
            find_py_spy()
    except (ValueError, ProfilerMissing) as exc:
        raise CommandError(str(exc)) from None
    return cfg


def _log(line: str) -> None:
    print(line, flush=True)


@functools.cache
def _gpu_name() -> str:
    """The first GPU's name as nvidia-smi reports it, or "" where that cannot be read."""
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""


def _environment(device: str) -> dict:
    import grpc
    import onnxruntime

    env = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "grpcio": grpc.__version__,
        "device": device,
    }
    if device == "cuda":
        env["gpu"] = _gpu_name()
    return env


def _where(cfg) -> str:
    """Where the model ran, for the log and the chart's title."""
    if cfg.device == "cuda":
        return f"{_gpu_name() or 'CUDA GPU'}, {os.cpu_count()} CPUs"
    return f"{os.cpu_count()} CPUs"


def run(args) -> int:
    cfg = _config(args)
    started = time.monotonic()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory(prefix="seqserve-bench-") as scratch:
        try:
            model = choose_model(args.model_dir, args.model, cfg.quick, Path(scratch))
        except BundleError as exc:
            raise CommandError(str(exc)) from None
        m = model.bundle.manifest
        _log(f"seqserve bench: {model.note}")
        _log(
            f"  {m.cell.upper()} {m.layers}x{m.hidden_size}, {m.state_bytes_per_session():,} state bytes/session; "
            f"{cfg.repeats} repeat(s) x {cfg.duration_s:g} s windows (+{cfg.warmup_s:g} s warm-up); "
            f"{cfg.client_procs} client processes x {cfg.streams_per_proc} streams; {_where(cfg)}"
        )
        eta = cfg.estimated_seconds()
        _log(f"  expected to take about {eta / 60:.0f} min" if eta >= 90 else f"  expected to take about {eta:.0f} s")
        runner = Runner(cfg, model, _log, args.out)
        try:
            runner.run()
        except BenchProcessError as exc:
            print(str(exc), file=sys.stderr)
            raise CommandError(f"benchmark stopped: {str(exc).splitlines()[0]}", 1) from None
    elapsed = time.monotonic() - started
    summaries = summarize(runner.measurements)
    verdicts = evaluate(cfg, runner.measurements, runner.memory)
    _log("")
    _log(f"Medians over {cfg.repeats} repeat(s):")
    _log(text_table(WORKLOAD_HEADER, workload_rows(summaries)))
    _log("")
    _log("Targets (ratios measured within each repeat, median over repeats):")
    _log(text_table(VERDICT_HEADER, verdict_rows(verdicts)))
    other = [m.extra["other_cores"] for m in runner.measurements if "other_cores" in m.extra]
    if other:
        mean = sum(other) / len(other)
        _log(
            f"Other processes on this machine used {mean:.2f} cores on average during the measurements "
            f"(max {max(other):.2f})"
            + ("; figures taken while they ran are lower than on a quiet machine." if max(other) > 0.25 else ".")
        )
    _write_outputs(args.out, stamp, cfg, model, runner, summaries, verdicts, elapsed)
    _log(f"total time {elapsed / 60:.1f} min")
    return 0


def _finite(value):
    """The record with NaN (not measured) as null, so the file is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _write_outputs(out: Path, stamp: str, cfg, model, runner, summaries, verdicts, elapsed: float) -> None:
    from .chart import write_chart

    out.mkdir(parents=True, exist_ok=True)
    m = model.bundle.manifest
    record = {
        "created": stamp,
        "elapsed_s": round(elapsed, 1),
        "model": {
            "note": model.note,
            "name": m.name,
            "version": m.version,
            "cell": m.cell,
            "layers": m.layers,
            "hidden_size": m.hidden_size,
            "state_bytes_per_session": m.state_bytes_per_session(),
        },
        "environment": _environment(cfg.device),
        "config": asdict(cfg),
        **runner.as_dict(),
        "summary": [asdict(s) for s in summaries],
        "targets": [asdict(v) for v in verdicts],
    }
    json_path = out / f"bench-{stamp}.json"
    json_path.write_text(json.dumps(_finite(record), indent=1, default=str) + "\n", encoding="utf-8")
    md_path = out / f"bench-{stamp}.md"
    md_path.write_text(
        markdown_table(WORKLOAD_HEADER, workload_rows(summaries))
        + "\n\n"
        + markdown_table(VERDICT_HEADER, verdict_rows(verdicts))
        + "\n",
        encoding="utf-8",
    )
    png_path = write_chart(
        summaries,
        out / f"bench-{stamp}.png",
        f"{m.name}: {m.cell.upper()} {m.layers}x{m.hidden_size}, {_where(cfg)}, {cfg.repeats} repeat(s)",
    )
    _log(f"wrote {json_path}, {md_path.name} and {png_path.name}")

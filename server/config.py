"""Server settings: one dataclass, documented once, read from flags, environment and a TOML file.

Precedence: command-line flag > ``SEQSERVE_<NAME>`` environment variable > ``--config`` file
(TOML; keys are the field names, top level or under a ``[server]`` table) > the default below.
Each field's ``help`` is the single place a setting is described: ``seqserve serve --help`` and
docs/server.md are generated from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .affinity import parse_choice

ENV_PREFIX = "SEQSERVE_"


def _setting(
    default: Any,
    help: str,
    choices: tuple[str, ...] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
):
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum, "maximum": maximum})


@dataclass
class ServerConfig:
    """Everything `seqserve serve` can be told. Field metadata ``help`` documents each setting."""

    models: str = _setting(
        "models", "folder of model bundles (<name>/<version>/); every valid bundle under it is served"
    )
    host: str = _setting("127.0.0.1", "address to listen on; loopback by default so nothing is exposed until asked")
    port: int = _setting(50051, "TCP port; 0 picks a free one (the 'listening on' log line names it)", minimum=0)
    metrics_port: int = _setting(
        9460,
        "HTTP port of the Prometheus /metrics endpoint (its own port, so it can stay off the public network); 0 turns metrics off",
        minimum=0,
    )
    metrics_host: str = _setting("", "address the metrics endpoint listens on; empty: the same as host")
    device: str = _setting(
        "auto",
        "where models run: cuda needs onnxruntime-gpu and a working CUDA; auto uses CUDA when it really works, else CPU",
        choices=("auto", "cpu", "cuda"),
    )
    intra_op_threads: int = _setting(
        1, "ONNX Runtime threads per model run; 1 leaves the other cores to gRPC and the event loop", minimum=1
    )
    batching: str = _setting(
        "on",
        "on: continuous batching across sessions; off: one model run per request (the naive baseline)",
        choices=("on", "off"),
    )
    max_batch: int = _setting(
        0,
        "most sessions advanced by one model run; bounds the latency one batch adds. 0: 256 on CPU, 1024 on CUDA",
        minimum=0,
    )
    max_run_rows: int = _setting(
        0,
        "most steps one step run takes: a tick with more runs them in several, sending each run's answers before the next starts, so clients prepare their next steps while the server computes. 0: 128 on CPU, max_batch on CUDA",
        minimum=0,
    )
    max_wait_ms: float = _setting(
        2.0, "longest a step waits for more steps to join its batch while requests keep arriving", minimum=0
    )
    loop_cpu: str = _setting(
        "auto",
        "keep the event-loop thread on one CPU (warm caches): auto picks the one it starts on when the process may use 2 or more, none lets it move, or a CPU number",
    )
    run_in_thread: bool = _setting(
        False,
        "run step batches on the model thread instead of the event loop (always so on CUDA); slower on a CPU with few cores",
    )
    gil_switch_ms: float = _setting(
        0.5,
        "Python's thread switch interval while serving: how long the event loop may keep the GIL while the model thread waits to start or finish a run (Python's default, 5 ms, would hold those runs back that long); 0 leaves Python's default",
        minimum=0,
    )
    max_sessions: int = _setting(10000, "open sessions allowed in total, over all models", minimum=1)
    max_sessions_per_model: int = _setting(10000, "open sessions allowed on one model version", minimum=1)
    idle_ttl_s: float = _setting(
        600.0, "a session idle this long expires and frees its state; 0 keeps idle sessions forever", minimum=0
    )
    when_full: str = _setting(
        "evict",
        "what creating a session does at a session limit: evict the least recently used idle session, or refuse with RESOURCE_EXHAUSTED",
        choices=("evict", "refuse"),
    )
    max_tokens_per_step: int = _setting(
        4096, "most tokens (or feature frames) one step may carry; bounds one run's time and memory", minimum=1
    )
    max_generate_tokens: int = _setting(4096, "most tokens one Generate call may produce", minimum=1)
    generate_tokens_per_message: int = _setting(
        64,
        "tokens per Generate message when the request leaves it to the server (at most 256); fewer, larger messages cost less under load",
        minimum=1,
    )
    generate_flush_ms: float = _setting(
        200.0,
        "a Generate message is sent at least this often while tokens are waiting, whatever their count (matters under load)",
        minimum=0,
    )
    max_prefill_chunk: int = _setting(
        256,
        "longest run one step or prompt gets per scheduler tick; longer ones run in pieces between other sessions' steps, so a long prompt does not stall them. 0: never split",
        minimum=0,
    )
    prefill_nice: int = _setting(
        10,
        "on a CPU, how much lower the OS priority (nice, up to 19) of the thread feeding long steps' and prompts' pieces is: while the cores are busy the other sessions' steps come first and the long prompt takes longer. 0: the same as the rest",
        minimum=0,
        maximum=19,  # the OS's lowest priority
    )
    max_inflight_per_stream: int = _setting(
        4096, "steps one StepStream may have queued before the server stops reading from it (back-pressure)", minimum=1
    )
    initial_slots: int = _setting(
        64, "state slots preallocated per model version; the slab doubles when they run out", minimum=1
    )
    ended_record: int = _setting(
        100000, "recently closed/expired/evicted session ids remembered, so a late step says what happened", minimum=0
    )
    shutdown_grace_s: float = _setting(
        10.0, "on SIGTERM/SIGINT, how long in-flight steps and generations may take to finish", minimum=0
    )
    log_level: str = _setting("info", "logging threshold", choices=("debug", "info", "warning", "error"))

    def validate(self) -> "ServerConfig":
        """Check every value against its field's choices and bounds; raise ConfigError naming it."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices, minimum, maximum = f.metadata["choices"], f.metadata["minimum"], f.metadata["maximum"]
            if choices and value not in choices:
                raise ConfigError(f"setting {f.name}: must be one of {', '.join(choices)}, got {value!r}")
            if minimum is not None and (isinstance(value, float) and not math.isfinite(value) or value < minimum):
                raise ConfigError(f"setting {f.name}: must be at least {minimum:g}, got {value!r}")
            if maximum is not None and value > maximum:
                raise ConfigError(f"setting {f.name}: must be at most {maximum:g}, got {value!r}")
        try:
            parse_choice(self.loop_cpu)
        except ValueError as exc:
            raise ConfigError(f"setting loop_cpu: {exc}") from None
        return self


class ConfigError(Exception):
    """A setting has a bad value or the config file cannot be read."""


def setting_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(ServerConfig))


def settings_table() -> str:
    """The settings as a markdown table (docs/server.md embeds it; a test keeps them equal)."""
    rows = ["| setting | flag | environment | default | meaning |", "|---|---|---|---|---|"]
    for f in setting_fields():
        choices = f" ({' / '.join(f.metadata['choices'])})" if f.metadata["choices"] else ""
        rows.append(
            f"| `{f.name}` | `--{f.name.replace('_', '-')}` | `{ENV_PREFIX}{f.name.upper()}` | "
            f"`{f.default}` | {f.metadata['help']}{choices} |"
        )
    return "\n".join(rows) + "\n"


def _convert(f: dataclasses.Field, raw: Any, origin: str) -> Any:
    kind = f.type if isinstance(f.type, type) else {"str": str, "int": int, "float": float, "bool": bool}[f.type]
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if kind is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
            raise ValueError
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"setting {f.name} ({origin}): expected {kind.__name__}, got {raw!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field (``--max-batch``), help from the field; unset flags stay absent."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"TOML file with settings (also {ENV_PREFIX}CONFIG); flags and environment override it",
    )
    for f in setting_fields():
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_text = f"{f.metadata['help']} (default: {default}; env {ENV_PREFIX}{f.name.upper()})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if f.metadata["choices"]:
            kwargs["choices"] = f.metadata["choices"]
        if f.type in (bool, "bool"):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif not f.metadata["choices"]:
            kwargs["metavar"] = f.name.upper()
        parser.add_argument(flag, **kwargs)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if isinstance(data.get("server"), dict):
        data = data["server"]
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def load_config(
    args: argparse.Namespace | Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> ServerConfig:
    """Merge default < file < environment < flags into a validated ServerConfig."""
    flags = dict(vars(args) if isinstance(args, argparse.Namespace) else (args or {}))
    env = os.environ if environ is None else environ
    fields = {f.name: f for f in setting_fields()}
    values: dict[str, Any] = {}
    config_path = flags.get("config") or env.get(ENV_PREFIX + "CONFIG")
    if config_path:
        for key, raw in read_config_file(config_path).items():
            if key not in fields:
                raise ConfigError(f"config file {config_path}: unknown setting {key!r}")
            values[key] = _convert(fields[key], raw, f"file {config_path}")
    for name, f in fields.items():
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = _convert(f, raw, f"env {ENV_PREFIX}{name.upper()}")
    for name, f in fields.items():
        if name in flags and flags[name] is not None:
            values[name] = _convert(f, flags[name], "flag --" + name.replace("_", "-"))
    config = ServerConfig(**values)
    config.models = str(Path(config.models))
    return config.validate()

"""The ``seqserve client`` sub-commands (argument parsing and exit codes live in ``cli.py``)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from .client import Client
from .session import Session
from .types import ModelInfo, SessionInfo

__all__ = ["dispatch", "load_frames", "models_table", "open_session"]


def _usage_error(message: str) -> Exception:
    from seqserve.cli import CommandError

    return CommandError(message, 2)


def _print_json(value: Any, out: TextIO) -> None:
    out.write(json.dumps(value, indent=2, sort_keys=False, default=lambda v: v.tolist()) + "\n")


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def models_table(models: list[ModelInfo]) -> str:
    """The models as an aligned text table, one row per model."""
    header = ("NAME", "VERSION", "VERSIONS", "KIND", "CELL", "LAYERS", "HIDDEN", "INPUT", "OUTPUTS", "STATE/SESSION")
    rows = [header] + [
        (
            m.name,
            str(m.version),
            ",".join(str(v) for v in m.versions) or str(m.version),
            m.kind,
            m.cell,
            str(m.layers),
            str(m.hidden_size),
            f"{m.input_kind}[{m.input_dim}]",
            str(m.output_size),
            _human_bytes(m.state_bytes_per_session),
        )
        for m in models
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows) + "\n"


def load_frames(path: str) -> np.ndarray:
    """Feature frames ``[n, dim]`` float32 from a ``.npy`` file or a ``.json`` list of lists."""
    file = Path(path)
    if file.suffix == ".npy":
        arr = np.load(file, allow_pickle=False)
    elif file.suffix == ".json":
        data = json.loads(file.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "frames" in data:
            data = data["frames"]
        arr = np.asarray(data)
    else:
        raise ValueError(f"{path}: frames must be a .npy or .json file")
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{path}: frames must be numbers, got {arr.dtype}")
    frames: np.ndarray = np.asarray(arr, dtype=np.float32)
    if frames.ndim == 1:
        frames = frames.reshape(1, -1)
    if frames.ndim != 2 or frames.shape[0] == 0:
        raise ValueError(f"{path}: frames must be shaped [n, dim] with n >= 1, got {list(frames.shape)}")
    return frames


def open_session(client: Client, model: str, session_id: str | None) -> Session:
    """A new session on ``model`` (closed on exit), or the existing ``session_id`` (left open)."""
    if session_id is None:
        return client.session(model)
    session = client.attach(session_id)
    if session.model != model:
        raise _usage_error(f"session {session_id} runs model {session.model!r}, not {model!r}")
    return session


def cmd_models(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """``models``: the served models as a table or JSON."""
    models = client.models()
    if args.json:
        _print_json([asdict(m) for m in models], out)
    else:
        out.write(models_table(models))
        if not models:
            print("the server serves no models", file=sys.stderr)
    return 0


def cmd_generate(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """``generate``: stream generated text to ``out`` as it arrives."""
    if not args.prompt and args.session is None:
        raise _usage_error("a new session needs a non-empty prompt (or continue one with --session ID)")
    with open_session(client, args.model, args.session) as session:
        generation = session.generate(
            args.prompt or None,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop=args.stop or None,
        )
        for piece in generation:
            out.write(piece)
            out.flush()
        if not generation.text.endswith("\n"):
            out.write("\n")
        out.flush()
    return 0


def cmd_classify(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """``classify``: class probabilities for text or feature frames, most likely first."""
    inputs: Any = args.text if args.text is not None else load_frames(args.frames)
    if isinstance(inputs, str) and not inputs:
        raise _usage_error("--text must not be empty")
    with client.session(args.model) as session:
        result = session.classify(inputs)
    if args.json:
        _print_json(
            {
                "label": result.label,
                "class_id": result.class_id,
                "position": result.position,
                "probs": dict(result.ranked()),
            },
            out,
        )
    else:
        width = max(len(label) for label, _ in result.ranked())
        for label, p in result.ranked():
            out.write(f"{label.ljust(width)}  {p:.4f}\n")
    return 0


def _session_lines(info: SessionInfo) -> str:
    return "".join(f"{key}: {value}\n" for key, value in asdict(info).items())


def cmd_session(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """``session create|get|reset|close``."""
    action = args.session_command
    if action == "create":
        session = client.session(args.model, version=args.version, session_id=args.id)
        if args.json:
            _print_json(asdict(session.last_info), out)
        else:
            out.write(session.id + "\n")
    elif action in ("get", "reset"):
        info = client.get_session(args.session_id) if action == "get" else client.reset_session(args.session_id)
        if args.json:
            _print_json(asdict(info), out)
        elif action == "get":
            out.write(_session_lines(info))
        else:
            out.write(f"reset {info.session_id} to position 0\n")
    else:
        position = client.close_session(args.session_id)
        if args.json:
            _print_json({"session_id": args.session_id, "position": position}, out)
        else:
            out.write(f"closed {args.session_id}" + (f" at position {position}" if position is not None else "") + "\n")
    return 0


def dispatch(client: Client, args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the chosen sub-command against ``client``; returns its exit code."""
    from .cli_chat import cmd_chat

    handlers = {
        "models": cmd_models,
        "generate": cmd_generate,
        "classify": cmd_classify,
        "chat": cmd_chat,
        "session": cmd_session,
    }
    return handlers[args.client_command](client, args, out or sys.stdout)

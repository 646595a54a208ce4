"""``seqserve client``: talk to a running server from the command line.

Exit codes (for scripts):
  0 ok; 1 other server error; 2 usage error; 3 not found (model, session, expired session);
  4 server unavailable (cannot connect, connection lost, deadline exceeded); 5 invalid input
  (bad tokens/frames/options, wrong session state, position mismatch, id taken); 6 server
  overloaded; 7 not authenticated / permission denied.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .config import ClientConfig, TlsConfig, default_target
from .errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidInput,
    ModelNotFound,
    NotFound,
    Overloaded,
    PermissionDenied,
    SeqServeError,
    SessionExpired,
    SessionNotFound,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "add_arguments",
    "run",
    "exit_code_for",
    "EXIT_OK",
    "EXIT_ERROR",
    "EXIT_USAGE",
    "EXIT_NOT_FOUND",
    "EXIT_UNAVAILABLE",
    "EXIT_INVALID",
    "EXIT_OVERLOADED",
    "EXIT_AUTH",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_UNAVAILABLE = 4
EXIT_INVALID = 5
EXIT_OVERLOADED = 6
EXIT_AUTH = 7

_EXIT_CODES: list[tuple[type[BaseException], int, str]] = [
    (SessionExpired, EXIT_NOT_FOUND, "session expired"),
    (SessionNotFound, EXIT_NOT_FOUND, "session not found"),
    (ModelNotFound, EXIT_NOT_FOUND, "unknown model"),
    (NotFound, EXIT_NOT_FOUND, "not found"),
    (Unavailable, EXIT_UNAVAILABLE, "server unavailable"),
    (DeadlineExceeded, EXIT_UNAVAILABLE, "deadline exceeded"),
    (InvalidInput, EXIT_INVALID, "invalid input"),
    (FailedPrecondition, EXIT_INVALID, "failed precondition"),
    (AlreadyExists, EXIT_INVALID, "already exists"),
    (Overloaded, EXIT_OVERLOADED, "server overloaded"),
    (Unauthenticated, EXIT_AUTH, "not authenticated"),
    (PermissionDenied, EXIT_AUTH, "permission denied"),
]


def exit_code_for(error: BaseException) -> tuple[int, str]:
    """The exit code for an SDK error and a short label for its message."""
    for cls, code, label in _EXIT_CODES:
        if isinstance(error, cls):
            return code, label
    return EXIT_ERROR, "server error"


def error_line(error: SeqServeError, target: str) -> str:
    """One line describing ``error`` for a terminal."""
    details = " ".join(str(error).split())
    if isinstance(error, Unavailable):
        return f"cannot reach server at {target}: {details}"
    _, label = exit_code_for(error)
    return details if details.lower().startswith(label) else f"{label}: {details}"


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _sampling_options(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    p.add_argument(
        "--max-tokens", type=int, default=max_tokens, help=f"tokens to generate at most (default {max_tokens})"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=temperature,
        help=f"sampling temperature, 0 = greedy (default {temperature})",
    )
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling mass (0 or 1: all)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--session", metavar="ID", default=None, help="continue an existing session instead of a new one")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``seqserve client``'s options and sub-commands to ``parser``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.add_argument("--target", default=None, help="server HOST:PORT (default $SEQSERVE_TARGET or 127.0.0.1:50051)")
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=None,
        help="deadline in seconds for each call, generation included (default 30; generation 600)",
    )
    parser.add_argument(
        "--retries",
        type=_non_negative_int,
        default=2,
        help="resends after the server is unreachable or the connection drops (default 2)",
    )
    parser.add_argument("--token", default=None, help="bearer token (default $SEQSERVE_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --root-certs)")
    parser.add_argument("--root-certs", metavar="PEM", default=None, help="CA certificates to trust (implies --tls)")
    parser.add_argument("--client-cert", metavar="PEM", default=None, help="client certificate for mutual TLS")
    parser.add_argument("--client-key", metavar="PEM", default=None, help="client private key for mutual TLS")
    parser.add_argument("--server-name", default=None, help="name to verify the server certificate against")
    sub = parser.add_subparsers(dest="client_command", metavar="COMMAND")

    p = sub.add_parser("models", help="list the served models")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("generate", help="stream generated text for a prompt")
    p.add_argument("model")
    p.add_argument("prompt", help="text fed before sampling starts ('' with --session: continue)")
    _sampling_options(p, max_tokens=64, temperature=1.0)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop sequence (repeatable)")

    p = sub.add_parser("classify", help="classify text or feature frames")
    p.add_argument("model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="text to classify (token models)")
    src.add_argument("--frames", metavar="FILE", help="feature frames [n, dim] as .npy or .json (feature models)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("chat", help="interactive: each stdin line is fed, then a reply is generated")
    p.add_argument("model")
    _sampling_options(p, max_tokens=200, temperature=0.8)

    p = sub.add_parser("session", help="create, inspect, reset or close sessions")
    ssub = p.add_subparsers(dest="session_command", metavar="ACTION")
    q = ssub.add_parser("create", help="create a session and print its id")
    q.add_argument("model")
    q.add_argument("--version", type=int, default=0, help="model version (default: latest)")
    q.add_argument("--id", default=None, help="choose the session id")
    q.add_argument("--json", action="store_true", help="print the session as JSON")
    for action, help_text in (
        ("get", "show a session"),
        ("reset", "reset a session to position 0"),
        ("close", "close a session"),
    ):
        q = ssub.add_parser(action, help=help_text)
        q.add_argument("session_id")
        q.add_argument("--json", action="store_true", help="print JSON")


def client_config(args: argparse.Namespace) -> ClientConfig:
    """The SDK configuration the command-line options describe."""
    tls = None
    if args.tls or args.root_certs or args.client_cert or args.client_key:
        tls = TlsConfig(
            root_certificates=args.root_certs,
            certificate_chain=args.client_cert,
            private_key=args.client_key,
            server_name_override=args.server_name,
        )
    overrides: dict[str, Any] = {
        "token": args.token or os.environ.get("SEQSERVE_TOKEN") or None,
        "tls": tls,
        "max_retries": args.retries,
    }
    if args.timeout is not None:
        overrides.update(timeout=args.timeout, generate_timeout=args.timeout)
    return ClientConfig().with_overrides(**overrides)


def run(args: argparse.Namespace) -> int:
    """Run ``seqserve client ...``; returns the exit code (see the module docstring)."""
    from seqserve.cli import CommandError

    from . import cli_commands
    from .client import Client

    command = args.client_command
    if command is None or (command == "session" and args.session_command is None):
        raise CommandError(
            "choose a command: models, generate, classify, chat or session (see seqserve client --help)", EXIT_USAGE
        )
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="replace")
    target = args.target or default_target()
    try:
        config = client_config(args)
        with Client(target, config=config) as client:
            return cli_commands.dispatch(client, args)
    except SeqServeError as exc:
        raise CommandError(error_line(exc, target), exit_code_for(exc)[0]) from None
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, without a traceback at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (ValueError, OSError) as exc:
        raise CommandError(str(exc), EXIT_INVALID) from None

"""The ``seqserve`` command. Each subcommand lives in its own package and is imported only when
used, so ``seqserve client ...`` works on a plain (client-only) install."""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from . import __version__

# subcommand -> (module with add_arguments(parser) and run(args) -> int, one-line help)
SUBCOMMANDS = {
    "export": ("seqserve.export.cli", "train a model and write an ONNX bundle"),
    "serve": ("seqserve.server.cli", "serve model bundles over gRPC"),
    "client": ("seqserve.client.cli", "talk to a running server"),
    "health": ("seqserve.client.health", "exit 0 if a server's gRPC health service says SERVING (container checks)"),
    "bench": ("seqserve.bench.cli", "benchmark the server against its baselines"),
}


class CommandError(Exception):
    """A user error a subcommand reports as one line (exit code 2 unless given)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def _load(module_name: str, command: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        extra = {"export": "export", "serve": "server", "bench": "server,export"}.get(command)
        hint = f" (install it with: pip install 'seqserve[{extra}]')" if extra else ""
        raise CommandError(f"seqserve {command} is not available: {exc}{hint}") from None


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqserve", description="Stateful streaming inference for LSTM/GRU models.")
    parser.add_argument("--version", action="version", version=f"seqserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the chosen subcommand's module is imported; the others are listed by name.
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            _load(module_name, name).add_arguments(p)
            p.set_defaults(_module=module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        if not getattr(args, "_module", None):
            parser.print_help()
            return 2
        return int(importlib.import_module(args._module).run(args) or 0)
    except CommandError as exc:
        print(f"seqserve: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

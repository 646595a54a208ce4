"""``seqserve serve``: settings from flags, environment and a config file; then run the server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from seqserve.bundle import BundleError
from seqserve.cli import CommandError

from .config import ConfigError, load_config
from .config import add_arguments as _add_setting_flags
from .runtime import DeviceUnavailable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Settings come from flags, then SEQSERVE_<NAME> environment variables, then the --config "
        "TOML file, then the defaults shown."
    )
    _add_setting_flags(parser)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    setup_logging(config.log_level)
    from .api.app import StartError, serve

    try:
        return asyncio.run(serve(config))
    except (DeviceUnavailable, BundleError, StartError) as exc:
        raise CommandError(str(exc), 1) from None

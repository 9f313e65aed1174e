"""Shared pieces of the subcommands: config loading with readable errors, exit codes."""

from __future__ import annotations

import argparse
import sys
from typing import Final

from appliance.config import Config, ConfigError, load_config

__all__ = ["EXIT_OK", "EXIT_USAGE", "add_config_arg", "config_or_exit", "fail"]

EXIT_OK: Final = 0
# Bad configuration, a port that cannot be bound, bad arguments: a person must act.
EXIT_USAGE: Final = 2


class CommandFailed(Exception):
    """Ends the command with ``code``, after printing ``message`` to stderr."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        self.message, self.code = message, code
        super().__init__(message)


def fail(message: str, code: int = EXIT_USAGE) -> CommandFailed:
    return CommandFailed(message, code)


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="TOML file (default: $APPLIANCE_CONFIG, else /etc/appliance/appliance.toml if present)")


def config_or_exit(args: argparse.Namespace) -> Config:
    try:
        config, _ = load_config(args.config)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"config error: {line}", file=sys.stderr)
        raise fail("the configuration is invalid; nothing was started") from exc
    return config

"""Shared pieces of the subcommands: config loading with readable errors, exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Final

from appliance.config import Config, ConfigError, load_config

__all__ = ["EXIT_OK", "EXIT_USAGE", "add_config_arg", "config_or_exit", "fail", "run_group"]

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


def run_group(name: str, register: Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None],
              argv: Sequence[str] | None = None) -> int:
    """``python3 -m appliance.commands.NAME ...``: one command group without importing the
    whole CLI (the boot-time services run before anything else, on a slow card)."""
    parser = argparse.ArgumentParser(prog="appliance")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args([name, *(sys.argv[1:] if argv is None else argv)])
    try:
        code: int = args.func(args)
    except CommandFailed as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.code
    return code

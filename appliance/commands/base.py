"""Shared pieces of the subcommands: config loading with readable errors, exit codes."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Final

import attrs

from appliance.config import Config, ConfigError, load_config
from appliance.protocol.text import Text
from appliance.storage.running import RunningBox, find_running, published_path

__all__ = ["EXIT_OK", "EXIT_USAGE", "Target", "add_box_args", "add_config_arg", "config_or_exit", "fail",
           "find_box", "run_group"]

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


def add_box_args(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--port-offset`` for a tool that talks to the running box. With
    neither, the tool talks to the box that published its ports on this machine."""
    add_config_arg(parser)
    parser.add_argument("--port-offset", type=int, default=None, metavar="N",
                        help="as given to `appliance run` (default: the running box's own ports)")


@attrs.frozen(kw_only=True)
class Target:
    """Where a tool finds the box: its host, bound ports and state directory, and how it knows."""

    host: str
    ports: dict[str, int]
    state_dir: str
    source: str  # in words (a Text): "the running box (pid N)" or "the configuration"
    language: str = "en"  # [admin] language: the tools speak it
    running: RunningBox | None = None


def find_box(args: argparse.Namespace) -> Target:
    """The running box this user's tools should talk to, unless ``--config`` or
    ``--port-offset`` says where; else the configuration's ports (plus any offset)."""
    explicit = getattr(args, "config", None) or getattr(args, "port_offset", None) is not None
    running = None if explicit else find_running()
    if running is not None:
        admin = running.config.get("admin")
        language = str(admin.get("language", "en")) if isinstance(admin, dict) else "en"
        return Target(host=running.host, ports=dict(running.ports), state_dir=running.state_dir,
                      source=Text("the running box (pid {pid}, {path})", pid=running.pid, path=str(running.path)),
                      language=language,
                      running=running)
    config = config_or_exit(args)
    host = config.lan.bind if config.lan.bind not in ("0.0.0.0", "::", "") else "127.0.0.1"
    offset = getattr(args, "port_offset", None) or 0
    where = (Text("the configuration with --port-offset {offset}", offset=offset) if offset
             else Text("the configuration"))
    if not explicit:
        where = (Text("{where} (no running box published its ports in {path})", where=where,
                      path=str(published_path())) if os.geteuid() == 0 else
                 Text("{where} (no running box published its ports in {path} nor /run/appliance)", where=where,
                      path=str(published_path())))
    return Target(host=host, ports=config.lan.ports.with_offset(offset).as_dict(), state_dir=config.storage.dir,
                  source=where, language=config.admin.language)

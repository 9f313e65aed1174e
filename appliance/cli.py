"""``appliance``: argv -> config -> logging -> ``trio.run(supervisor.run)`` and the tools.

Exit codes: 0 done; 1 a core service failed for good (systemd restarts the box); 2 a
person must act (bad configuration, a port that cannot be bound, bad arguments).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from appliance import __version__
from appliance.commands import (
    bundle,
    demo,
    devkit_cloud,
    devkit_device,
    discover,
    events,
    firewall,
    health,
    info,
    pair,
    run,
    setup,
    update,
)
from appliance.commands.base import CommandFailed

__all__ = ["main", "parser"]

# Each module adds its subcommands; the order is the order of `appliance --help`.
COMMAND_MODULES = (
    run, demo, info, health, bundle, events, firewall, devkit_cloud, devkit_device, discover, pair, setup, update,
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="appliance", description="The store appliance.")
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except CommandFailed as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    return code

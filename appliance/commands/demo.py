"""``appliance demo``: the appliance with a simulated cloud and devices, to see orders flow."""

from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path

import trio

from appliance.commands.base import EXIT_OK
from appliance.commands.run import _report
from appliance.logs import setup_logging

__all__ = ["register"]


def _default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/appliance-demo")
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "appliance-demo"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="run the appliance with a simulated cloud and devices (loopback only)")
    p.add_argument("--state-dir", type=Path, help="where the demo keeps its files (default: a per-user dir)")
    p.add_argument("--port-offset", type=int, default=None, metavar="N",
                   help="add N to every listener port (default: 0 as root, 10000 otherwise)")
    p.add_argument("--products", type=int, default=200, help="catalog size (default 200)")
    p.add_argument("--order-every", type=float, default=5.0, metavar="S", help="seconds between kiosk orders")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from appliance.commands.demo_shop import DemoOptions, run_demo  # needs the demo extra (trustme)

    setup_logging("warning", "text")
    offset = args.port_offset if args.port_offset is not None else (0 if os.geteuid() == 0 else 10000)
    options = DemoOptions(state_dir=args.state_dir or _default_state_dir(), port_offset=offset,
                          products=args.products, order_every_s=args.order_every)
    try:
        trio.run(partial(run_demo, options, say=lambda line: print(line, flush=True)))
    except Exception as exc:  # noqa: BLE001  # the process boundary: one line and an exit code
        return _report(exc)
    return EXIT_OK

"""``appliance demo``: the appliance with a simulated cloud and devices, to see orders flow."""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import trio

from appliance.commands.base import EXIT_OK, fail
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
    p.add_argument("--online-orders", action="store_true",
                   help="also take orders online through Service Bus, served by this checkout's test AMQP peer "
                        "(needs scripts/setup --test)")
    p.set_defaults(func=cmd_demo)


def _say(line: str) -> None:
    print(line, flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    from appliance.commands.demo_shop import DemoOptions, ServiceBusEndpoint, run_demo  # the demo extra

    setup_logging("warning", "text")
    offset = args.port_offset if args.port_offset is not None else (0 if os.geteuid() == 0 else 10000)
    options = DemoOptions(state_dir=args.state_dir or _default_state_dir(), port_offset=offset,
                          products=args.products, order_every_s=args.order_every)
    try:
        if not args.online_orders:
            trio.run(partial(run_demo, options, say=_say))
            return EXIT_OK
        with _test_service_bus(options.state_dir) as server:
            bus = ServiceBusEndpoint(namespace=server.namespace, endpoint=server.endpoint, ca_file=server.ca_file,
                                     sas_key_name=server.sas_key_name, sas_key=server.sas_key)
            trio.run(partial(run_demo, options, bus=bus, say=_say))
    except Exception as exc:  # noqa: BLE001  # the process boundary: one line and an exit code
        return _report(exc)
    return EXIT_OK


@contextlib.contextmanager
def _test_service_bus(state_dir: Path) -> Iterator[Any]:
    """The checkout's AMQP 1.0 test peer (tests/amqp), standing in for a Service Bus
    namespace on loopback. It is not part of the installed product: only a checkout has it."""
    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / "tests" / "amqp" / "server.py").is_file():
        raise fail("--online-orders needs a checkout of the repository (its tests/amqp test peer)")
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    try:
        from tests.amqp.fixtures import PEER_MISSING, run_server
    except ImportError as exc:
        raise fail(f"--online-orders needs the test extra: run scripts/setup --test ({exc})") from exc
    if PEER_MISSING:
        raise fail(f"--online-orders: {PEER_MISSING}")
    with run_server(state_dir / "amqp-tls", sas_key=secrets.token_hex(16)) as server:
        yield server

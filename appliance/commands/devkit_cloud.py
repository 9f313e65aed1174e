"""``appliance devkit cloud``: the cloud simulator in the foreground, for the demo and tests.

Prints one JSON line when it serves (``{"url", "port", "ca", "store_id", "pair_code"}``),
then serves until SIGTERM or SIGINT (exit 0). A port that cannot be bound exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

import attrs
import trio

from appliance.commands.base import EXIT_OK, EXIT_USAGE

__all__ = ["devkit_subparsers", "register"]


def devkit_subparsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """The ``appliance devkit`` group, created by whichever devkit module registers first."""
    existing = sub.choices.get("devkit")
    if existing is None:
        group = sub.add_parser("devkit", help="simulators for tests, the demo and technicians")
        return group.add_subparsers(dest="devkit_command", required=True, metavar="SIMULATOR")
    for action in existing._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise RuntimeError("the devkit parser has no subcommands")


def _nonnegative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = devkit_subparsers(sub).add_parser(
        "cloud", help="the platform's sync API over HTTPS (docs/cloud-contract.md)",
        description="Serve the cloud sync contract with a generated catalog; prints one JSON line when ready.")
    p.add_argument("--port", type=_nonnegative, default=0, help="TCP port (0: any free port; default 0)")
    p.add_argument("--bind", default="127.0.0.1", metavar="ADDR", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--products", type=_nonnegative, default=20, metavar="N", help="generated products (default 20)")
    p.add_argument("--seed", type=int, default=1, help="catalog seed (default 1)")
    p.add_argument("--store", default="store-0001", metavar="S", help="store id (default store-0001)")
    p.add_argument("--pair-code", default="PAIR-0001", metavar="C", help="the pairing code (default PAIR-0001)")
    p.add_argument("--retention", type=_positive, default=10_000, metavar="K",
                   help="changes the feed keeps; older cursors get 410 (default 10000)")
    p.add_argument("--tls-dir", default="", metavar="DIR",
                   help="where ca.pem (for clients) and the server certificate go; the CA is reused "
                        "(default: a temporary directory)")
    p.add_argument("--videos", type=_nonnegative, default=0, metavar="N",
                   help="large generated media files (promotions/video-NNN.mp4; default 0)")
    p.add_argument("--video-bytes", type=_nonnegative, default=100 * 1024 * 1024, metavar="B",
                   help="size of each large media file (default 100 MiB)")
    p.add_argument("--no-orders", action="store_true", help="pairing gives no orders queue")
    p.add_argument("--no-support", action="store_true", help="pairing gives no support queue")
    p.set_defaults(func=cmd_cloud)


def cmd_cloud(args: argparse.Namespace) -> int:
    from appliance.devkit.cloud import BindError, SimConfig, run_cloud_simulator

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    config = SimConfig(host=args.bind, port=args.port, tls_dir=args.tls_dir, products=args.products,
                       seed=args.seed, store_id=args.store, pair_code=args.pair_code, retention=args.retention,
                       videos=args.videos, video_bytes=args.video_bytes)
    if args.no_orders:
        config = attrs.evolve(config, orders=None)
    if args.no_support:
        config = attrs.evolve(config, support=None)

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                handle = await nursery.start(run_cloud_simulator, config)
                print(json.dumps(handle.ready_line()), flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    failed: list[BindError] = []
    try:
        trio.run(main)
    except* BindError as group:
        failed.extend(exc for exc in group.exceptions if isinstance(exc, BindError))
    for exc in failed:
        print(f"error: cannot listen on {exc.host}:{exc.port}: {exc.cause.strerror or exc.cause}; "
              "choose another --port or --bind", file=sys.stderr)
    return EXIT_USAGE if failed else EXIT_OK

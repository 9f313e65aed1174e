"""``appliance simulate-device``: a simulated printer, kitchen screen or POS on the device channel.

A technician runs it on a laptop on the shop's LAN, declares it on the box (``[[devices]]``
with the laptop's address, or adopts it), and watches the box's commands arrive: the
8081 path proven end to end. It listens on every interface by default (``--bind
0.0.0.0``) because the box must reach it from the LAN; tests pass ``--bind 127.0.0.1``.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from functools import partial
from pathlib import Path

import trio

from appliance.commands.base import EXIT_OK, fail
from appliance.devkit.device import DEVICE_KINDS, DeviceSimulator, run_device_simulator
from appliance.protocol.channel_codec import SUBPROTOCOL

__all__ = ["register"]


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a rate is between 0 and 1, got {value}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("simulate-device", help="play a shop device (printer, kds, pos) on the device channel",
                       description="Serve the device channel (WebSocket, subprotocol chub.device.v1) like a shop "
                                   "device: hello, then an ack for each command, logged as JSON lines.")
    p.add_argument("--port", type=int, default=8081, help="TCP port to listen on (default 8081; 0: any free port)")
    p.add_argument("--bind", default="0.0.0.0", metavar="ADDR",
                   help="address to listen on (default 0.0.0.0: reachable from the LAN)")
    p.add_argument("--id", dest="device_id", metavar="ID", help="device id sent in hello (default sim-KIND-HOST)")
    p.add_argument("--kind", choices=DEVICE_KINDS, default="printer")
    p.add_argument("--log", metavar="FILE", help="append each command taken (first time only) as a JSON line")
    p.add_argument("--fsync", action="store_true", help="fsync the log before each ack (survives a power cut)")
    p.add_argument("--nack-rate", type=_rate, default=0.0, metavar="R",
                   help="answer this share of commands with a nack (retry: true)")
    p.add_argument("--delay-ms", type=_non_negative, default=0.0, metavar="D",
                   help="take this long to process each command")
    p.add_argument("--drop-rate", type=_rate, default=0.0, metavar="R",
                   help="cut the TCP connection (no close frame) before this share of commands")
    p.add_argument("--seed", type=int, help="random seed for the misbehaviours (repeatable runs)")
    p.add_argument("--quiet", action="store_true", help="do not print each command taken")
    p.set_defaults(func=cmd_simulate_device)


def cmd_simulate_device(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise fail(f"--port must be between 0 and 65535, got {args.port}")
    device_id = args.device_id or f"sim-{args.kind}-{socket.gethostname()}"
    log_path = Path(args.log) if args.log else None
    try:
        simulator = DeviceSimulator(device_id=device_id, kind=args.kind, log_path=log_path, fsync=args.fsync,
                                    nack_rate=args.nack_rate, delay_s=args.delay_ms / 1000.0,
                                    drop_rate=args.drop_rate, seed=args.seed,
                                    echo=None if args.quiet else partial(print, flush=True))
    except OSError as exc:
        raise fail(f"cannot open the log {args.log}: {exc.strerror or exc}") from exc

    async def main() -> None:
        # Ctrl-C and SIGTERM end the simulator cleanly (a signal receiver, not KeyboardInterrupt
        # raised wherever the loop happens to be).
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(partial(run_device_simulator, simulator, port=args.port, bind=args.bind))
                taken = len(simulator.accepted)
                print(f"device {device_id} ({args.kind}) listening on ws://{args.bind}:{port}/ "
                      f"(subprotocol {SUBPROTOCOL})" + (f"; log {log_path} ({taken} command(s) already taken)"
                                                       if log_path else ""), flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except BaseException as exc:  # the process boundary: a bind error, possibly in a group
        if isinstance(bind_error := _leaf(exc, OSError), OSError):
            raise fail(f"cannot listen on {args.bind}:{args.port}: {bind_error.strerror or bind_error}") from exc
        raise
    finally:
        simulator.close()
    print(f"stopped; {len(simulator.accepted)} command(s) taken, {simulator.duplicates} duplicate(s) acked",
          file=sys.stderr)
    return EXIT_OK


def _leaf(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of ``kind`` in ``exc`` or the groups it holds."""
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            if (found := _leaf(sub, kind)) is not None:
                return found
        return None
    return exc if isinstance(exc, kind) else None

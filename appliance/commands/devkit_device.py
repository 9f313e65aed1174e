"""``appliance simulate-device``: a simulated printer, kitchen screen or POS on the device channel.

A technician runs it on a laptop on the shop's LAN and watches the box's commands arrive:
the 8081 path proven end to end, with the device identity a real device has
(docs/device-api.md). Either it enrolls (``--enroll http://BOX:8003``: it prints the
comparison code, the manager adopts it on the homepage) or it is declared in
``[[devices]]`` with a pre-shared key (``--key``, from ``appliance device-key``). With
``--api http://BOX:8000`` it also posts signed sales, as a till does. ``--impostor``
plays an attacker at a device's address: it claims the id without the key.

``appliance device-key`` makes a pre-shared key for a ``[[devices]]`` entry and prints it
once. It listens on every interface by default (``--bind
0.0.0.0``) because the box must reach it from the LAN; tests pass ``--bind 127.0.0.1``.
"""

from __future__ import annotations

import argparse
import secrets
import signal
import socket
import sys
from functools import partial
from pathlib import Path

import httpx
import trio

from appliance.commands.base import EXIT_OK, fail
from appliance.devkit.device import DEVICE_KINDS, DeviceSimulator, run_device_simulator
from appliance.devkit.device_client import DeviceAuth, enroll, wait_adopted
from appliance.protocol import identity as idp
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
    who = p.add_mutually_exclusive_group()
    who.add_argument("--enroll", metavar="URL", help="enroll on the box's provisioning port (http://BOX:8003), show "
                                                     "the comparison code, wait to be adopted")
    who.add_argument("--key", metavar="HEX", help="the device's pre-shared key (its [[devices]] entry's key)")
    who.add_argument("--impostor", action="store_true",
                     help="play an attacker: claim the id without the key (for tests of the box)")
    p.add_argument("--advertise-port", type=int, metavar="N",
                   help="device-channel port to enroll with (default: the port listened on)")
    p.add_argument("--api", metavar="URL", help="post a signed sale to the store API (http://BOX:8000) once adopted")
    p.add_argument("--sale-every", type=_non_negative, default=0.0, metavar="S",
                   help="with --api: post a sale every S seconds (default: once)")
    p.set_defaults(func=cmd_simulate_device)

    k = sub.add_parser("device-key", help="make a pre-shared key for a [[devices]] entry (printed once)",
                       description="Print a new random device key and the lines to add to the box's configuration. "
                                   "It is shown once and kept nowhere: give it to the device's setup now.")
    k.add_argument("device_id", metavar="ID", help="the device's id")
    k.set_defaults(func=cmd_device_key)


def cmd_device_key(args: argparse.Namespace) -> int:
    key = secrets.token_hex(32)
    print(f"# device {args.device_id}: its pre-shared key (shown once; the device's setup needs it too)\n"
          f"[[devices]]\nid = \"{args.device_id}\"\nkind = \"...\"\naddress = \"...\"\nkey = \"{key}\"")
    return EXIT_OK


def cmd_simulate_device(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise fail(f"--port must be between 0 and 65535, got {args.port}")
    device_id = args.device_id or f"sim-{args.kind}-{socket.gethostname()}"
    log_path = Path(args.log) if args.log else None
    try:
        simulator = DeviceSimulator(device_id=device_id, kind=args.kind, log_path=log_path, fsync=args.fsync,
                                    nack_rate=args.nack_rate, delay_s=args.delay_ms / 1000.0,
                                    drop_rate=args.drop_rate, seed=args.seed,
                                    echo=None if args.quiet else partial(print, flush=True),
                                    key=_key(args.key), impostor=args.impostor)
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
                nursery.start_soon(_identity, simulator, args, args.advertise_port or port)
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


def _key(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        return idp.key_from_hex(text.strip().lower(), "--key")
    except idp.BadKey as exc:
        raise fail(f"{exc} (as printed by appliance device-key)") from exc


async def _identity(simulator: DeviceSimulator, args: argparse.Namespace, port: int) -> None:
    """Enroll (if asked), wait to be adopted, then post signed sales (if asked)."""
    device_id = simulator.device_id
    if args.enroll:
        async with httpx.AsyncClient(base_url=args.enroll, timeout=10.0, trust_env=False) as client:
            try:
                enrolled = await enroll(client, device_id=device_id, kind=args.kind, name=device_id, port=port)
            except httpx.HTTPStatusError as exc:
                print(f"enrollment refused: HTTP {exc.response.status_code} {exc.response.text[:300]}", flush=True)
                return
            except httpx.HTTPError as exc:
                print(f"cannot reach the box at {args.enroll}: {exc!r}", flush=True)
                return
            simulator.key = enrolled.key
            replaces = " (it replaces the key the box had for this id)" if enrolled.replaces else ""
            print(f"enrolled; comparison code {enrolled.code[:3]} {enrolled.code[3:]}{replaces}: adopt it on the "
                  "box's homepage if it shows the same code", flush=True)
            await wait_adopted(client, enrolled)
            print("adopted: the box accepted this device's key", flush=True)
    if args.api and simulator.key is not None:
        await _sales(args.api, device_id, simulator.key, args.sale_every)


async def _sales(api: str, device_id: str, key: bytes, every_s: float) -> None:
    async with httpx.AsyncClient(base_url=api, auth=DeviceAuth(device_id, key), timeout=10.0,
                                 trust_env=False) as client:
        while True:
            sale = {"id": f"{device_id}-{secrets.token_hex(6)}", "device_id": device_id, "currency": "EUR",
                    "total_cents": 250, "lines": [{"sku": "sim-1", "qty": 1, "unit_price_cents": 250}]}
            try:
                answer = await client.post("/v1/sales", json=sale)
                print(f"sale {sale['id']} -> HTTP {answer.status_code}", flush=True)
            except httpx.HTTPError as exc:
                print(f"sale {sale['id']} not sent: {exc!r}", flush=True)
            if not every_s:
                return
            await trio.sleep(every_s)


def _leaf(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of ``kind`` in ``exc`` or the groups it holds."""
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            if (found := _leaf(sub, kind)) is not None:
                return found
        return None
    return exc if isinstance(exc, kind) else None

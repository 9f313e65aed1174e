"""``appliance discover``: find the appliances on the LAN the way a device does.

Sends one discovery probe (kind ``tool``: boxes answer it but do not register it) to the
broadcast address of each up IPv4 interface, to 255.255.255.255 out of each of those
interfaces (so a laptop with an address in the wrong subnet still reaches the box), and
to every ``--target``; probes once more halfway through ``--timeout`` if nobody answered
yet; prints each box that answers with our nonce. Nothing is verified (a laptop does not
know the store secret); whether an announce is signed is shown.

Exit codes: 0 at least one box answered; 1 none did; 2 bad arguments or no probe could
be sent.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import secrets
import socket
import struct
import sys
import time
from typing import Any, Final

from appliance.commands.base import EXIT_OK, fail
from appliance.config import Ports
from appliance.protocol import discovery as wire
from appliance.services.netif import beacon_interfaces, interfaces

__all__ = ["register"]

EXIT_NONE_FOUND: Final = 1
MAX_TIMEOUT_S: Final = 60.0
IP_PKTINFO: Final = getattr(socket, "IP_PKTINFO", 8)  # <linux/in.h>; exported by Python 3.12+


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("discover", help="find the appliances on the LAN (sends a discovery probe)")
    p.add_argument("--timeout", type=float, default=3.0, metavar="S", help="how long to wait for answers (default 3)")
    p.add_argument("--json", action="store_true", help="print the answers as JSON")
    p.add_argument("--port", type=int, default=Ports().discovery, metavar="P",
                   help=f"the discovery port (default {Ports().discovery})")
    p.add_argument("--target", action="append", default=[], metavar="ADDR",
                   help="also probe this IPv4 address directly (repeatable)")
    p.add_argument("--no-broadcast", action="store_true", help="probe only the --target addresses")
    p.set_defaults(func=cmd_discover)


def _probe(nonce: str) -> bytes:
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:40] or "laptop"
    # Kind "tool" and port 0 (no command port): the box answers and registers nothing.
    probe = wire.Probe(device_id=f"tool-{host}", kind="tool", name=wire.clean_name(f"appliance discover on {host}"),
                       port=0, nonce=nonce)
    return wire.encode(probe)


def _check_args(args: argparse.Namespace) -> list[str]:
    if not 0 < args.timeout <= MAX_TIMEOUT_S:
        raise fail(f"--timeout must be more than 0 and at most {MAX_TIMEOUT_S:g} seconds, got {args.timeout:g}")
    if not 1 <= args.port <= 65535:
        raise fail(f"--port must be 1-65535, got {args.port}")
    targets = []
    for target in args.target:
        try:
            targets.append(str(ipaddress.IPv4Address(target)))
        except ValueError:
            raise fail(f"--target {target!r} is not an IPv4 address") from None
    if args.no_broadcast and not targets:
        raise fail("--no-broadcast without --target: nothing to probe")
    return targets


def _send_all(sock: socket.socket, datagram: bytes, port: int, targets: list[str], broadcast: bool) -> int:
    sent = 0
    sends: list[tuple[str, int]] = [(t, 0) for t in targets]
    if broadcast:
        for iface in beacon_interfaces(interfaces()):
            assert iface.broadcast is not None
            sends += [(iface.broadcast, 0), ("255.255.255.255", iface.index)]
    for dest, ifindex in sends:
        try:
            if ifindex:
                pktinfo = struct.pack("@i4s4s", ifindex, bytes(4), bytes(4))
                sock.sendmsg([datagram], [(socket.IPPROTO_IP, IP_PKTINFO, pktinfo)], 0, (dest, port))
            else:
                sock.sendto(datagram, (dest, port))
            sent += 1
        except OSError as exc:
            via = f" (interface #{ifindex})" if ifindex else ""
            print(f"warning: probe to {dest}:{port}{via} not sent: {exc.strerror or exc}", file=sys.stderr)
    return sent


def _found(announce: wire.Announce, source: tuple[str, int]) -> dict[str, Any]:
    return {"address": announce.address, "appliance_id": announce.appliance_id, "store_id": announce.store_id,
            "name": announce.name, "firmware": announce.firmware, "ports": dict(announce.ports),
            "signed": announce.sig is not None, "replied_from": f"{source[0]}:{source[1]}", "ts": announce.ts}


def discover(*, port: int, targets: list[str], broadcast: bool, timeout_s: float) -> list[dict[str, Any]]:
    """Probe and collect the answers for ``timeout_s`` seconds (one entry per box and address)."""
    nonce = secrets.token_hex(8)
    datagram = _probe(nonce)
    found: dict[tuple[str, str], dict[str, Any]] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.bind(("0.0.0.0", 0))
        if _send_all(sock, datagram, port, targets, broadcast) == 0:
            raise fail("no probe could be sent (no IPv4 interface is up?)")
        start = time.monotonic()
        deadline = start + timeout_s
        resend_at: float | None = start + timeout_s / 2
        while (now := time.monotonic()) < deadline:
            if resend_at is not None and now >= resend_at:
                if not found:
                    _send_all(sock, datagram, port, targets, broadcast)
                resend_at = None
            wake = deadline if resend_at is None else min(deadline, resend_at)
            sock.settimeout(max(wake - now, 0.001))
            try:
                data, source = sock.recvfrom(2048)
            except (TimeoutError, ConnectionRefusedError):  # nothing yet; an ICMP error from a target
                continue
            try:
                message = wire.decode(data)
            except wire.DiscoveryError:
                continue
            if isinstance(message, wire.Announce) and message.nonce == nonce:
                found.setdefault((message.appliance_id, message.address), _found(message, source))
    return list(found.values())


def _text(box: dict[str, Any]) -> str:
    ports = ", ".join(f"{role} {port}" for role, port in box["ports"].items())
    store = box["store_id"] or "not paired"
    signed = "signed" if box["signed"] else "unsigned"
    via = "" if box["replied_from"].split(":")[0] == box["address"] else f" (answered from {box['replied_from']})"
    return (f"{box['address']}  {box['name']}  [{box['appliance_id']}]  store: {store} ({signed})  "
            f"firmware {box['firmware']}{via}\n    ports: {ports}")


def cmd_discover(args: argparse.Namespace) -> int:
    targets = _check_args(args)
    boxes = discover(port=args.port, targets=targets, broadcast=not args.no_broadcast, timeout_s=args.timeout)
    if args.json:
        print(json.dumps(boxes, indent=2))
    else:
        for box in boxes:
            print(_text(box))
    if not boxes:
        print(f"no appliance answered within {args.timeout:g} s on udp/{args.port}; check this machine is on the "
              "shop's network and that udp/57854 is not blocked, or try --target <address of the box>",
              file=sys.stderr)
        return EXIT_NONE_FOUND
    return EXIT_OK

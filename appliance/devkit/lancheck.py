#!/usr/bin/env python3
"""LAN check: find the store appliance on this network and try every one of its ports.

One file, standard library only: a technician runs it on a laptop plugged into the
shop's LAN (``python3 lan-check``). It broadcasts a discovery probe on UDP 57854 (and
sends one to ``--target`` if given), lists every box that answers, then for each box
opens each TCP listener of the port map the box announced and asks ``GET /healthz``.
A port that does not answer is named with the likely cause.

Exit code: 0 a box answered and all its ports work, 1 a box answered but some port
failed, 2 no box answered.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Box", "check_ports", "discover", "main"]

MAGIC = b"CHUB\x01"
MAX_DATAGRAM = 1200
DISCOVERY_PORT = 57854
# Listener roles to try over HTTP; discovery and the device channel are not HTTP listeners of the box.
HTTP_ROLES = ("admin", "api", "events", "media", "provisioning", "ops", "support")


@dataclass
class Box:
    address: str  # where the answer came from
    announce: dict[str, object]
    results: dict[str, str] = field(default_factory=dict)  # role -> "ok" or the problem

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r == "ok" for r in self.results.values())


def probe_datagram(nonce: str) -> bytes:
    # Kind "tool" and port 0: the box answers but does not list this laptop as a device.
    host = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "._-") else "-" for ch in socket.gethostname())
    body = {"type": "probe", "device_id": f"lan-check-{host}"[:64], "kind": "tool",
            "name": "lan-check", "port": 0, "nonce": nonce}
    return MAGIC + json.dumps(body, separators=(",", ":")).encode()


def discover(*, port: int, targets: Sequence[str], broadcast: bool, timeout: float) -> list[Box]:
    nonce = os.urandom(8).hex()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.bind(("0.0.0.0", 0))
    datagram = probe_datagram(nonce)
    boxes: dict[str, Box] = {}
    try:
        if broadcast:
            sock.sendto(datagram, ("255.255.255.255", port))
        for target in targets:
            sock.sendto(datagram, (target, port))
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            try:
                data, (addr, _) = sock.recvfrom(MAX_DATAGRAM + 1)
            except TimeoutError:
                break
            if not data.startswith(MAGIC) or len(data) > MAX_DATAGRAM:
                continue
            try:
                body = json.loads(data[len(MAGIC):])
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if not isinstance(body, dict) or body.get("type") != "announce" or body.get("nonce") != nonce:
                continue
            key = str(body.get("appliance_id", addr))
            boxes.setdefault(key, Box(addr, body))
    finally:
        sock.close()
    return list(boxes.values())


def _healthz(address: str, port: int, timeout: float) -> str:
    try:
        with socket.create_connection((address, port), timeout=timeout) as conn:
            conn.sendall(f"GET /healthz HTTP/1.1\r\nHost: {address}:{port}\r\nConnection: close\r\n\r\n".encode())
            head = conn.recv(4096).split(b"\r\n", 1)[0].decode("latin-1")
    except ConnectionRefusedError:
        return "connection refused: the service is not running (see the box's homepage or `appliance health`)"
    except TimeoutError:
        return "no answer: a firewall between this laptop and the box drops the port"
    except OSError as exc:
        return f"cannot connect: {exc.strerror or exc}"
    if " 200 " not in f"{head} ":
        return f"unexpected answer: {head or 'nothing'}"
    return "ok"


def check_ports(box: Box, *, timeout: float) -> None:
    ports = box.announce.get("ports")
    if not isinstance(ports, dict):
        box.results["ports"] = "the box announced no port map"
        return
    # The box says which address to use; a box that names an address this laptop cannot
    # reach is the classic discovery failure, so try the announced one, not the sender's.
    address = str(box.announce.get("address") or box.address)
    for role in HTTP_ROLES:
        port = ports.get(role)
        if isinstance(port, int):
            box.results[role] = _healthz(address, port, timeout)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Find the store appliance on this LAN and try its ports.")
    parser.add_argument("--target", action="append", default=[], metavar="ADDR",
                        help="also probe this address directly (when broadcasts are filtered)")
    parser.add_argument("--no-broadcast", action="store_true", help="only probe the --target addresses")
    parser.add_argument("--port", type=int, default=DISCOVERY_PORT, help="discovery port (default 57854)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for answers (default 3)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    boxes = discover(port=args.port, targets=args.target, broadcast=not args.no_broadcast, timeout=args.timeout)
    for box in boxes:
        check_ports(box, timeout=min(args.timeout, 3.0))
    code = 2 if not boxes else (0 if all(b.ok for b in boxes) else 1)
    if args.json:
        print(json.dumps({"exit_code": code, "boxes": [
            {"address": b.address, "announce": b.announce, "ports": b.results} for b in boxes]}, indent=2))
        return code
    if not boxes:
        print(f"No appliance answered on UDP {args.port} within {args.timeout:g} s.")
        print("  fix: check the box is powered and on this network; if the network filters broadcasts, "
              "run again with --target <box address>; UDP 57854 must be allowed both ways.")
        return code
    for b in boxes:
        a = b.announce
        print(f"Appliance {a.get('appliance_id')} at {a.get('address')} (answered from {b.address}), "
              f"store {a.get('store_id') or 'not paired'}, firmware {a.get('firmware')}, "
              f"{'signed' if a.get('sig') else 'unsigned'}")
        ports = a.get("ports")
        for role, result in b.results.items():
            port = ports.get(role, "?") if isinstance(ports, dict) else "?"
            print(f"  {'ok  ' if result == 'ok' else 'FAIL'}  {role:13} {port}/tcp  {'' if result == 'ok' else result}")
    return code


if __name__ == "__main__":
    sys.exit(main())

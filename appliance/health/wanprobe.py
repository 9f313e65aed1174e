#!/usr/bin/env python3
"""WAN preflight: can this network reach the platform's hosts on HTTPS 443?

One file, standard library only, so a technician runs it on any laptop with a bare
Python 3 before installing a box (``python3 preflight``), and the appliance runs the same
code for its WAN health checks. For each host it tries, in order, and stops at the first
hop that fails, saying which one and what to do:

  dns    the name resolves
  tcp    a TCP connection to port 443 opens (or, with a proxy, to the proxy)
  proxy  the proxy accepts ``CONNECT host:443`` (only with --proxy)
  tls    the TLS handshake succeeds and the certificate verifies for the name
  http   an HTTP request gets any HTTP answer (a status, even 404, proves the path works)

Exit code: 0 every required host reachable, 1 only optional ones failed, 2 a required
one failed. Nothing is sent beyond a TLS handshake and ``HEAD /``.
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

__all__ = ["DEFAULT_HOSTS", "HopResult", "HostReport", "ProbeProxy", "Target", "Text", "main", "probe"]


class Text(str):
    """English words that also keep their template and values, so that the appliance can
    say them in the shop's language (``appliance/protocol/text.py`` reads ``template``
    and ``args``). Here, not imported: this file runs alone with the standard library."""

    template: str
    args: dict[str, object]

    def __new__(cls, template: str, /, **args: object) -> Text:
        self = super().__new__(cls, template.format(**args) if args else template)
        self.template, self.args = template, args
        return self


# The system's words for the usual failures, said in the shop's language (the appliance's
# catalogs have them); any other error keeps the system's own text.
_ERRNO_WORDS = {errno.ECONNREFUSED: Text("connection refused"), errno.ECONNRESET: Text("connection reset"),
                errno.EHOSTUNREACH: Text("no route to host"), errno.ENETUNREACH: Text("network unreachable"),
                errno.ETIMEDOUT: Text("timed out")}
_GAI_WORDS = {socket.EAI_NONAME: Text("name or service not known"),
              socket.EAI_AGAIN: Text("temporary failure in name resolution")}


def _os_words(exc: OSError) -> str:
    table = _GAI_WORDS if isinstance(exc, socket.gaierror) else _ERRNO_WORDS
    return table.get(exc.errno or 0) or exc.strerror or str(exc)


@dataclass(frozen=True)
class Target:
    name: str  # what it is for, in words
    host: str
    port: int = 443
    required: bool = True
    connect_to: str = ""  # connect here ("addr:port") instead of resolving host (a test endpoint)
    ca_file: str = ""  # an extra CA for this host only (else the run's --ca-file)


# The seed's WAN openings (every one HTTPS on 443).
DEFAULT_HOSTS: tuple[Target, ...] = (
    Target("sync API", "api.server.commerce-hub.io"),
    Target("online orders (Service Bus)", "e-serversync-ns.servicebus.windows.net"),
    Target("media (blob storage)", "simplementedata.blob.core.windows.net"),
    Target("log intake", "api.logmatic.io", required=False),
    Target("remote support (Service Bus)", "koostodesapp-ns.servicebus.windows.net", required=False),
)


@dataclass(frozen=True)
class ProbeProxy:
    host: str
    port: int
    username: str = ""
    password: str = ""

    @classmethod
    def parse(cls, url: str) -> ProbeProxy:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "") or not parts.hostname:
            raise ValueError(f"proxy must look like http://[user:pass@]host:port, got {url!r}")
        return cls(parts.hostname, parts.port or 3128, parts.username or "", parts.password or "")


@dataclass(frozen=True)
class HopResult:
    hop: str
    ok: bool
    message: str
    fix: str = ""
    ms: float = 0.0


@dataclass
class HostReport:
    target: Target
    hops: list[HopResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.hops) and all(h.ok for h in self.hops)

    @property
    def failed_hop(self) -> HopResult | None:
        return next((h for h in self.hops if not h.ok), None)


class _Fail(Exception):
    def __init__(self, hop: str, message: str, fix: str) -> None:
        super().__init__(message)
        self.hop, self.message, self.fix = hop, message, fix


def _split(addr: str, default_port: int) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return (host, int(port)) if host else (addr, default_port)


def _connect(host: str, port: int, timeout: float, hop: str, fix: str) -> socket.socket:
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except TimeoutError as exc:
        raise _Fail(hop, Text("no answer from {host}:{port} within {seconds} s ({error})", host=host, port=port,
                              seconds=format(timeout, "g"), error=str(exc)),
                    Text("{fix} (a firewall that drops packets looks like this)", fix=fix)) from exc
    except OSError as exc:
        raise _Fail(hop, Text("cannot connect to {host}:{port}: {error}", host=host, port=port,
                              error=_os_words(exc)), fix) from exc


def _read_head(sock: socket.socket | ssl.SSLSocket, limit: int = 16384) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data and len(data) < limit:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def probe(target: Target, *, proxy: ProbeProxy | None = None, ca_file: str = "", timeout: float = 5.0) -> HostReport:
    """Try each hop to ``target``; the report ends at the first that fails."""
    report = HostReport(target)
    started = time.monotonic()

    def done(hop: str, message: str) -> None:
        report.hops.append(HopResult(hop, True, message, ms=round((time.monotonic() - started) * 1000, 1)))

    sock: socket.socket | None = None
    try:
        if proxy is None:
            addr, port = _split(target.connect_to, target.port) if target.connect_to else (target.host, target.port)
            if not target.connect_to:
                try:
                    infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
                except socket.gaierror as exc:
                    raise _Fail("dns", Text("{host} does not resolve: {error}", host=target.host,
                                            error=_os_words(exc)),
                                Text("check the box's DNS servers (DHCP) and that the name is allowed by the "
                                     "DNS filter of the network")) from exc
                done("dns", f"{target.host} -> {infos[0][4][0]}")
            sock = _connect(addr, port, timeout, "tcp",
                            Text("open outbound TCP {port} to {host} in the shop's firewall, or set a proxy",
                                 port=target.port, host=target.host))
            done("tcp", f"connected to {addr}:{port}")
        else:
            sock = _connect(proxy.host, proxy.port, timeout, "proxy",
                            Text("check the proxy address {host}:{port} and that the proxy is running",
                                 host=proxy.host, port=proxy.port))
            done("tcp", f"connected to the proxy {proxy.host}:{proxy.port}")
            auth = ""
            if proxy.username:
                token = base64.b64encode(f"{proxy.username}:{proxy.password}".encode()).decode()
                auth = f"Proxy-Authorization: Basic {token}\r\n"
            sock.sendall(f"CONNECT {target.host}:{target.port} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
                         f"{auth}\r\n".encode())
            head = _read_head(sock)
            status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = status_line.split(" ", 2)
            if len(parts) < 2 or parts[1] != "200":
                fix = (Text("the proxy needs credentials: give them in the proxy URL") if " 407" in status_line else
                       Text("allow CONNECT to {host}:{port} in the proxy's rules", host=target.host, port=target.port))
                raise _Fail("proxy", Text("the proxy refused CONNECT {host}:{port}: {answer}", host=target.host,
                                          port=target.port, answer=status_line or Text("no answer")), fix)
            done("proxy", f"CONNECT {target.host}:{target.port} accepted")
        context = ssl.create_default_context()
        if target.ca_file or ca_file:
            context.load_verify_locations(cafile=target.ca_file or ca_file)
        try:
            tls = context.wrap_socket(sock, server_hostname=target.host)
        except ssl.SSLCertVerificationError as exc:
            raise _Fail("tls", Text("the certificate of {host} does not verify: {error}", host=target.host,
                                    error=str(exc.verify_message)),
                        Text("a proxy or firewall inspects TLS: add its CA with [cloud] ca_file (the box never "
                             "turns verification off); or check the box's clock")) from exc
        except (ssl.SSLError, OSError) as exc:
            raise _Fail("tls", Text("TLS handshake with {host} failed: {error}", host=target.host, error=str(exc)),
                        Text("something between the box and the internet interferes with HTTPS")) from exc
        sock = tls
        done("tls", f"{tls.version()}, certificate verified for {target.host}")
        tls.sendall(f"HEAD / HTTP/1.1\r\nHost: {target.host}\r\nConnection: close\r\n"
                    f"User-Agent: appliance-preflight\r\n\r\n".encode())
        try:
            head = _read_head(tls)
        except (OSError, ssl.SSLError) as exc:
            raise _Fail("http", Text("no HTTP answer from {host}: {error}", host=target.host, error=str(exc)),
                        Text("retry; if it persists, call support")) from exc
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        if not status_line.startswith("HTTP/"):
            raise _Fail("http", Text("no HTTP answer from {host} (got {answer})", host=target.host,
                                     answer=repr(status_line[:60])),
                        Text("retry; if it persists, call support"))
        done("http", status_line)
    except _Fail as fail:
        report.hops.append(HopResult(fail.hop, False, fail.message, fail.fix,
                                     ms=round((time.monotonic() - started) * 1000, 1)))
    finally:
        if sock is not None:
            sock.close()
    return report


def exit_code(reports: Sequence[HostReport]) -> int:
    if any(not r.ok and r.target.required for r in reports):
        return 2
    return 1 if any(not r.ok for r in reports) else 0


def _parse_target(text: str) -> Target:
    # NAME=HOST[:PORT][@CONNECT_TO]
    name, _, rest = text.partition("=")
    if not rest:
        raise argparse.ArgumentTypeError(f"expected NAME=HOST[:PORT][@ADDR:PORT], got {text!r}")
    hostport, _, connect_to = rest.partition("@")
    host, port = _split(hostport, 443)
    return Target(name, host, port, True, connect_to)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check that this network lets the store appliance reach "
                                     "its platform (HTTPS 443 only, optionally through a proxy).")
    parser.add_argument("--proxy", help="http://[user:pass@]host:port of the shop's proxy, if any")
    parser.add_argument("--ca-file", default="", help="extra CA (PEM) of a TLS-inspecting proxy")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per connection (default 5)")
    parser.add_argument("--host", action="append", type=_parse_target, metavar="NAME=HOST[:PORT][@ADDR:PORT]",
                        help="check this host instead of the default list (repeatable)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        proxy = ProbeProxy.parse(args.proxy) if args.proxy else None
    except ValueError as exc:
        parser.error(str(exc))
    targets = args.host or list(DEFAULT_HOSTS)
    reports = [probe(t, proxy=proxy, ca_file=args.ca_file, timeout=args.timeout) for t in targets]
    code = exit_code(reports)
    if args.json:
        print(json.dumps({"exit_code": code, "hosts": [
            {"name": r.target.name, "host": r.target.host, "port": r.target.port, "required": r.target.required,
             "ok": r.ok, "hops": [asdict(h) for h in r.hops]} for r in reports]}, indent=2))
        return code
    via = f" through the proxy {proxy.host}:{proxy.port}" if proxy else ""
    print(f"WAN preflight{via}:")
    for r in reports:
        mark = "ok  " if r.ok else ("FAIL" if r.target.required else "warn")
        last = r.hops[-1] if r.hops else None
        print(f"  {mark}  {r.target.host}:{r.target.port}  ({r.target.name}"
              f"{'' if r.target.required else ', optional'})")
        if last is not None and not last.ok:
            print(f"        {last.hop}: {last.message}")
            print(f"        fix: {last.fix}")
    print({0: "All required hosts are reachable.", 1: "Required hosts reachable; some optional ones are not.",
           2: "Some required hosts are NOT reachable: the box will not work fully until fixed."}[code])
    return code


if __name__ == "__main__":
    sys.exit(main())

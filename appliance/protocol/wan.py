"""The vocabulary of every WAN path (sync, Service Bus, media blobs, logs), sans-I/O.

A failed call is a :class:`HopFailure` value: the :class:`Hop` of the path that broke
(DNS, TCP, the proxy, TLS, HTTP), the host:port there, what is true and what to do, in
words for a person. ``appliance.services.wan`` builds them from httpx's errors; nothing
here raises. :func:`bypasses_proxy` is the one NO_PROXY rule of every WAN path and of the
WAN health checks.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs

from appliance.protocol.text import Text

__all__ = ["FIXES", "Hop", "HopFailure", "bypasses_proxy"]


class Hop(enum.StrEnum):
    DNS = "dns"
    TCP = "tcp"
    PROXY = "proxy"
    TLS = "tls"
    HTTP = "http"


FIXES: Final[Mapping[Hop, str]] = {
    Hop.DNS: Text("check the box's DNS servers and internet link (or set [wan] proxy if the shop needs one)"),
    Hop.TCP: Text("check the internet link and that outbound TCP 443 is allowed (or set [wan] proxy)"),
    Hop.PROXY: Text("check [wan] proxy (address, port, credentials) and that the proxy allows CONNECT to port 443"),
    Hop.TLS: Text("check the box's clock; if the shop's proxy inspects TLS, put its CA in [cloud] ca_file "
                  "(verification stays on)"),
    Hop.HTTP: Text("check [cloud] api_url; if it persists, send the logs to support"),
}


@attrs.frozen(kw_only=True)
class HopFailure:
    """One failed call to a WAN host, located on its network path, in plain words."""

    hop: Hop
    target: str  # host:port of the hop that failed (the proxy's for PROXY)
    message: str  # what is true, for a person
    fix: str  # what a person should do
    status: int | None = None

    @classmethod
    def at(cls, hop: Hop, target: str, message: str, *, status: int | None = None) -> HopFailure:
        return cls(hop=hop, target=target, message=message, fix=FIXES[hop], status=status)

    def as_dict(self) -> dict[str, Any]:
        return {"hop": str(self.hop), "target": self.target, "message": self.message, "fix": self.fix,
                "status": self.status}


def bypasses_proxy(host: str, no_proxy: Sequence[str]) -> bool:
    """Whether ``[wan] no_proxy`` sends ``host`` direct: the one NO_PROXY rule of every WAN
    path (sync, Service Bus, media blobs, logs). Entries: ``*``; a host, also matching its
    subdomains (with or without a leading ``.`` or ``*.``); ``host:port`` (the port is not
    looked at: every WAN call is on 443); an IP address or a CIDR network (``10.0.0.0/8``),
    which match IP-literal hosts only."""
    host = host.lower().strip("[]").rstrip(".")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for raw in no_proxy:
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        entry = entry.rsplit(":", 1)[0] if entry.count(":") == 1 else entry  # host:port -> host
        domain = entry.lstrip("*").lstrip(".").rstrip(".")
        if domain and (host == domain or host.endswith("." + domain)):
            return True
    return False

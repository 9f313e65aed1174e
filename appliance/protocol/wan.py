"""The vocabulary of every WAN path (sync, Service Bus, media blobs, logs), sans-I/O.

A failed call is a :class:`HopFailure` value: the :class:`Hop` of the path that broke
(DNS, TCP, the proxy, TLS, HTTP), the host:port there, what is true and what to do, in
words for a person. ``appliance.services.wan`` builds them from httpx's errors; nothing
here raises.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Final

import attrs

__all__ = ["FIXES", "Hop", "HopFailure"]


class Hop(enum.StrEnum):
    DNS = "dns"
    TCP = "tcp"
    PROXY = "proxy"
    TLS = "tls"
    HTTP = "http"


FIXES: Final[Mapping[Hop, str]] = {
    Hop.DNS: "check the box's DNS servers and internet link (or set [wan] proxy if the shop needs one)",
    Hop.TCP: "check the internet link and that outbound TCP 443 is allowed (or set [wan] proxy)",
    Hop.PROXY: "check [wan] proxy (address, port, credentials) and that the proxy allows CONNECT to port 443",
    Hop.TLS: ("check the box's clock; if the shop's proxy inspects TLS, put its CA in [cloud] ca_file "
              "(verification stays on)"),
    Hop.HTTP: "check [cloud] api_url; if it persists, send the logs to support",
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

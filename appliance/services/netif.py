"""The box's IPv4 interfaces, read from the kernel with three ioctls (no subprocess, no deps).

``socket.if_nameindex()`` lists the interfaces; for each, ``SIOCGIFFLAGS``,
``SIOCGIFADDR`` and ``SIOCGIFBRDADDR`` (netdevice(7)) give its flags, its primary IPv4
address and its broadcast address. An interface without IPv4 or that vanishes between
the listing and the ioctl is skipped. Secondary addresses (``ip addr add`` a second
time) are not listed: the beacon announces the primary one, which is what DHCP gives.

Every call is a few syscalls answered from kernel memory, so the event loop calls them
directly.

:func:`route_source` answers "which of my addresses would the kernel use to reach X" with
a connected UDP socket: ``connect`` does a route lookup and sends nothing.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import socket
import struct
from typing import Final

import attrs

__all__ = ["Interface", "beacon_interfaces", "interfaces", "parse_ifreq_address", "route_source"]

# <linux/sockios.h> and <net/if.h>
SIOCGIFFLAGS: Final = 0x8913
SIOCGIFADDR: Final = 0x8915
SIOCGIFBRDADDR: Final = 0x8919
IFF_UP: Final = 0x1
IFF_BROADCAST: Final = 0x2
IFF_LOOPBACK: Final = 0x8
IFF_RUNNING: Final = 0x40
_IFNAMSIZ: Final = 16
_IFREQ_SIZE: Final = 40  # struct ifreq on Linux (16-byte name + 24-byte union)
# Errors that mean "no such address on this interface (any more)", not a broken system.
_SKIP: Final = frozenset({errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENXIO, errno.EINVAL})


@attrs.frozen(kw_only=True)
class Interface:
    name: str
    index: int
    address: str
    broadcast: str | None  # None without IFF_BROADCAST (loopback, point-to-point)
    up: bool
    loopback: bool


def _ifreq(name: str) -> bytes:
    return struct.pack(f"{_IFNAMSIZ}s{_IFREQ_SIZE - _IFNAMSIZ}x", name.encode()[: _IFNAMSIZ - 1])


def parse_ifreq_address(ifreq: bytes) -> str:
    """The IPv4 address in an ifreq answer (a ``sockaddr_in`` after the 16-byte name)."""
    if len(ifreq) < _IFNAMSIZ + 8:
        raise ValueError(f"ifreq too short: {len(ifreq)} bytes")
    family = struct.unpack_from("@H", ifreq, _IFNAMSIZ)[0]
    if family != socket.AF_INET:
        raise ValueError(f"not an IPv4 sockaddr (family {family})")
    return socket.inet_ntoa(ifreq[_IFNAMSIZ + 4 : _IFNAMSIZ + 8])


def parse_ifreq_flags(ifreq: bytes) -> int:
    return int(struct.unpack_from("@H", ifreq, _IFNAMSIZ)[0])


def _one(sock: socket.socket, index: int, name: str) -> Interface | None:
    try:
        flags = parse_ifreq_flags(fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, _ifreq(name)))
        address = parse_ifreq_address(fcntl.ioctl(sock.fileno(), SIOCGIFADDR, _ifreq(name)))
        broadcast = None
        if flags & IFF_BROADCAST:
            broadcast = parse_ifreq_address(fcntl.ioctl(sock.fileno(), SIOCGIFBRDADDR, _ifreq(name)))
    except OSError as exc:
        if exc.errno in _SKIP:
            return None
        raise
    except ValueError:
        return None
    if broadcast == "0.0.0.0":
        broadcast = None
    return Interface(name=name, index=index, address=address, broadcast=broadcast,
                     up=bool(flags & IFF_UP) and bool(flags & IFF_RUNNING), loopback=bool(flags & IFF_LOOPBACK))


def interfaces() -> list[Interface]:
    """Every interface with an IPv4 address, in index order."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for index, name in sorted(socket.if_nameindex()):
            iface = _one(sock, index, name)
            if iface is not None:
                found.append(iface)
    return found


def beacon_interfaces(all_interfaces: list[Interface]) -> list[Interface]:
    """The interfaces a beacon goes out on: up, not loopback, with a broadcast address."""
    return [i for i in all_interfaces if i.up and not i.loopback and i.broadcast is not None]


def route_source(destination: str) -> str | None:
    """The local address the kernel would send from to reach ``destination``, or None."""
    try:
        ip = ipaddress.IPv4Address(destination)
    except ValueError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.connect((str(ip), 9))  # a route lookup only: UDP connect sends nothing
            local = sock.getsockname()[0]
        except OSError:
            return None
    return None if local == "0.0.0.0" else str(local)

"""sd_notify in a few lines: READY=1, WATCHDOG=1, STOPPING=1 to ``$NOTIFY_SOCKET``.

The protocol is one datagram per message to a Unix socket; a leading ``@`` names an
abstract socket (sd_notify(3)). Without ``$NOTIFY_SOCKET`` (not under systemd) every call
is a no-op. A send that would block or fails is logged and dropped: notification is
advice to systemd, never a reason to stop serving the shop.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier", "watchdog_interval_s"]

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if path.startswith("@"):
            self.address = "\0" + path[1:]
        elif path.startswith("/"):
            self.address = path

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, message: str) -> None:
        if self.address is None:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            try:
                sock.sendto(message.encode(), self.address)
            except OSError as exc:
                log.warning("sd_notify %r to %s failed: %s", message, self.address.lstrip("\0"), exc)


def watchdog_interval_s(env: Mapping[str, str] = os.environ) -> float | None:
    """Half of ``$WATCHDOG_USEC`` if the watchdog is meant for this process, else None."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2_000_000

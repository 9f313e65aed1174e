"""The per-runtime state records: typed fields of :class:`~appliance.services.runtime.Runtime`.

Each record has one owner, the only module that writes it; everyone else reads it through
the runtime (``runtime.device_links``, ``runtime.orders_link``, ...). The owners are named
in ``Runtime`` beside each field, and ``tests/test_architecture.py`` holds the tree to them.
Nothing here does I/O; a restart of the owning service resets its record itself.

- :class:`BoundPorts`: the port map as bound (``of(role)``); written by the listeners and
  discovery when they bind.
- :class:`DeviceLinkBoard`: the device channel's links by device id; written by the dispatcher.
- :class:`QueueLinkStatus` (phases :class:`QueuePhase`): what one Service Bus consumer is
  doing; written by the queue consumer of the orders or support service.
- :class:`SupportWindow`: when the remote support channel is open; written by the support
  service (``switch_support``).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator, Mapping
from datetime import datetime

import attrs
import trio

from appliance.config import PORT_ROLES, Ports
from appliance.services.device_link import LinkStatus
from appliance.services.signal import ChangeSignal
from appliance.storage.outbox import Backlog

__all__ = ["BoundPorts", "DeviceLinkBoard", "QueueLinkStatus", "QueuePhase", "SupportWindow"]


class BoundPorts(Mapping[str, int]):
    """The effective port map: the configured one, with each listener's port as bound
    (differs with ``--port-offset`` or port 0). Discovery announces this one.

    Read with :meth:`of` (or as a mapping, role -> port); the service that binds a role
    records it with :meth:`bind`. Every role of the port map is always present.
    """

    def __init__(self, configured: Ports) -> None:
        self._ports = configured.as_dict()

    def of(self, role: str) -> int:
        """The port of ``role``: as bound once its service has bound it, else as configured."""
        return self._ports[role]

    def bind(self, role: str, port: int) -> None:
        if role not in self._ports:
            raise KeyError(f"{role!r} is not a role of the port map ({', '.join(r.role for r in PORT_ROLES)})")
        self._ports[role] = port

    def __getitem__(self, role: str) -> int:
        return self._ports[role]

    def __iter__(self) -> Iterator[str]:
        return iter(self._ports)

    def __len__(self) -> int:
        return len(self._ports)

    def __repr__(self) -> str:
        return f"BoundPorts({self._ports!r})"


class DeviceLinkBoard:
    """The device channel's links of one running appliance, by device id, for the web
    parts and health. The dispatcher writes it (and clears it when it restarts)."""

    def __init__(self) -> None:
        self.links: dict[str, LinkStatus] = {}
        self.backlog: dict[str, Backlog] = {}
        self.backlog_at: float | None = None

    def all(self) -> list[LinkStatus]:
        return [self.links[k] for k in sorted(self.links)]


class QueuePhase(enum.StrEnum):
    OFF = "off"  # switched off in the config (or the support window ended)
    UNCONFIGURED = "unconfigured"  # no queue or key yet (not paired, or the store has no such service)
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RETRYING = "retrying"  # the link failed; next try at next_try_at
    AUTH_FAILED = "auth_failed"  # the namespace refused the key
    CONFIG_ERROR = "config_error"  # the options cannot work


@attrs.define(kw_only=True)
class QueueLinkStatus:
    """What one queue consumer is doing (health, /metrics, the homepage)."""

    name: str
    phase: QueuePhase = QueuePhase.OFF
    detail: str = ""
    namespace: str = ""
    queue: str = ""
    last_error: str = ""
    last_error_at: float | None = None
    failing_since: float | None = None
    next_try_at: float | None = None
    connected_at: float | None = None
    last_message_at: float | None = None
    received: int = 0
    completed: int = 0
    dead_lettered: int = 0
    abandoned: int = 0
    locks_lost: int = 0
    failures: int = 0

    def as_dict(self) -> dict[str, object]:
        return attrs.asdict(self) | {"phase": str(self.phase)}

    def record_failure(self, phase: QueuePhase, error: str, now: float, next_try_at: float | None) -> None:
        self.phase, self.last_error, self.last_error_at, self.next_try_at = phase, error, now, next_try_at
        self.failing_since = self.failing_since or now
        self.failures += 1


@attrs.define(kw_only=True, eq=False)
class SupportWindow:
    """When the channel is on: until ``until_wall`` (Unix time, for people) which is
    ``deadline`` on trio's clock. ``changes`` wakes the service when an admin switches it."""

    deadline: float | None = None
    until_wall: float | None = None
    changes: ChangeSignal = attrs.field(factory=ChangeSignal)

    def open(self, duration_s: float) -> None:
        self.open_until(time.time() + duration_s)

    def open_until(self, until_wall: float) -> None:
        """Open until a wall-clock time (a window restored after a restart keeps its end)."""
        self.deadline = trio.current_time() + max(0.0, until_wall - time.time())
        self.until_wall = until_wall
        self.changes.notify()

    def close(self) -> None:
        self.deadline = self.until_wall = None
        self.changes.notify()

    @property
    def is_open(self) -> bool:
        return self.deadline is not None and trio.current_time() < self.deadline

    def describe(self) -> str:
        if self.until_wall is None or not self.is_open:
            return "off"
        return f"enabled until {datetime.fromtimestamp(self.until_wall).strftime('%H:%M')}"

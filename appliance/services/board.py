"""The board of supervised services: what each is doing, read by the homepage and /readyz.

The supervisor writes each service's state, crashes and last error; a service writes only
its own short ``detail`` word, through :meth:`ServiceBoard.say`. Everything else reads.
"""

from __future__ import annotations

import enum

import attrs

__all__ = ["ServiceBoard", "ServiceState", "ServiceStatus"]


class ServiceState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"  # crashed; waiting out its backoff
    FAILED = "failed"  # crashed too often; left down
    DISABLED = "disabled"  # turned off in config or not applicable
    STOPPED = "stopped"


@attrs.define(kw_only=True)
class ServiceStatus:
    name: str
    core: bool
    state: ServiceState = ServiceState.STARTING
    crashes: int = 0
    last_error: str = ""
    detail: str = ""  # a short word from the service itself (e.g. "bound on :8000")

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "core": self.core, "state": str(self.state), "crashes": self.crashes,
                "last_error": self.last_error, "detail": self.detail}


class ServiceBoard:
    def __init__(self) -> None:
        self._services: dict[str, ServiceStatus] = {}

    def add(self, name: str, *, core: bool) -> ServiceStatus:
        status = ServiceStatus(name=name, core=core)
        self._services[name] = status
        return status

    def say(self, name: str, detail: str) -> None:
        """A service's own short word on the board (e.g. "bound on :8000"); ignored for a
        service the board does not list (a service run on its own, as in tests)."""
        if (status := self._services.get(name)) is not None:
            status.detail = detail

    def get(self, name: str) -> ServiceStatus | None:
        return self._services.get(name)

    def all(self) -> list[ServiceStatus]:
        return list(self._services.values())

    def not_ready(self) -> list[str]:
        """Reasons /readyz answers 503: core services not running, any service failed."""
        reasons = []
        for s in self._services.values():
            if s.state is ServiceState.FAILED:
                reasons.append(f"{s.name} failed: {s.last_error or 'crashed too often'}")
            elif s.core and s.state not in (ServiceState.RUNNING, ServiceState.DISABLED):
                reasons.append(f"{s.name} is {s.state}")
        return reasons

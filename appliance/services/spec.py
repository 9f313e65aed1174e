"""How a service is described to the supervisor."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol

import attrs
import trio

from appliance.services.runtime import Runtime

__all__ = ["ServiceRun", "ServiceSpec"]


class ServiceRun(Protocol):
    """A service's task: ``run(runtime, *, task_status)``; mypy refuses another signature."""

    def __call__(self, runtime: Runtime, *, task_status: trio.TaskStatus[Any] = ...) -> Awaitable[None]: ...


@attrs.frozen(kw_only=True)
class ServiceSpec:
    """``run(runtime, *, task_status)`` calls ``task_status.started()`` once it is ready.

    ``core``: the box is not ready without it, and if it fails for good the process ends.
    ``graceful``: it returns by itself once ``runtime.stopping`` is set, after finishing
    in-flight work (listeners, the device dispatcher); other services are cancelled as
    soon as the stop begins. ``enabled=False`` shows it as disabled and never runs it.
    """

    name: str
    run: ServiceRun
    core: bool = True
    graceful: bool = False
    enabled: bool = True

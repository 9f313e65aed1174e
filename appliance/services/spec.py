"""How a service is described to the supervisor."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import attrs

__all__ = ["ServiceSpec"]


@attrs.frozen(kw_only=True)
class ServiceSpec:
    """``run(runtime, *, task_status)`` calls ``task_status.started()`` once it is ready.

    ``core``: the box is not ready without it, and if it fails for good the process ends.
    ``graceful``: it returns by itself once ``runtime.stopping`` is set, after finishing
    in-flight work (listeners, the device dispatcher); other services are cancelled as
    soon as the stop begins. ``enabled=False`` shows it as disabled and never runs it.
    """

    name: str
    run: Callable[..., Awaitable[None]]
    core: bool = True
    graceful: bool = False
    enabled: bool = True

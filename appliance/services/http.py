"""One HTTP listener: a socket bound by us, served by hypercorn's trio worker.

We bind the socket ourselves (rather than letting hypercorn do it) so a port that cannot
be bound stops start-up with one clear :class:`BindError` naming the port, the service and
the fix, instead of an exception group from deep inside the server.

Graceful stop: when ``runtime.stopping`` is set hypercorn stops accepting, lets in-flight
requests finish for up to ``supervisor.shutdown_deadline_s``, then cancels them.
"""

from __future__ import annotations

import errno
import logging
import socket

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from starlette.types import ASGIApp

from appliance.services.runtime import Runtime

__all__ = ["BindError", "bind_tcp", "run_listener"]

log = logging.getLogger(__name__)

# Connections waiting for accept(); the shop's devices are tens, not thousands.
BACKLOG = 128


class BindError(Exception):
    """A listener's port cannot be bound. The message is one line for a person."""

    def __init__(self, *, role: str, host: str, port: int, cause: OSError) -> None:
        self.role, self.host, self.port, self.cause = role, host, port, cause
        if cause.errno == errno.EACCES:
            fix = ("ports below 1024 need root or CAP_NET_BIND_SERVICE; run as a normal user with "
                   "--port-offset 10000 (or set [lan.ports])")
        elif cause.errno == errno.EADDRINUSE:
            fix = (f"another program holds it (`ss -ltnp 'sport = :{port}'` shows which); stop it, or use "
                   "--port-offset N or [lan.ports]")
        elif cause.errno == errno.EADDRNOTAVAIL:
            fix = "the address is not on this machine; check [lan] bind"
        else:
            fix = "check [lan] bind and [lan.ports]"
        super().__init__(f"cannot listen on {host}:{port} for the {role} service: "
                         f"{cause.strerror or cause}; {fix}")


def bind_tcp(host: str, port: int, *, role: str, user_timeout_s: float | None = None) -> socket.socket:
    """``user_timeout_s``: TCP_USER_TIMEOUT, inherited by accepted sockets: the kernel drops
    a connection whose sent data stays unacknowledged that long, a peer that stopped
    reading included (a send blocked in hypercorn cannot be cancelled: it is shielded)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if user_timeout_s is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, round(user_timeout_s * 1000)))
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise BindError(role=role, host=host, port=port, cause=exc) from exc
    return sock


def hypercorn_config(runtime: Runtime, fd: int) -> HypercornConfig:
    cfg = HypercornConfig()
    cfg.bind = [f"fd://{fd}"]
    cfg.graceful_timeout = runtime.config.supervisor.shutdown_deadline_s
    cfg.keep_alive_timeout = runtime.config.http.keep_alive_timeout_s
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("appliance.http")
    # The apps enforce body limits per route; this bounds a single WebSocket message.
    cfg.websocket_max_message_size = runtime.config.http.max_body_bytes
    cfg.backlog = BACKLOG
    return cfg


async def run_listener(
    runtime: Runtime,
    app: ASGIApp,
    *,
    role: str,
    user_timeout_s: float | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on the port of ``role`` until ``runtime.stopping``; started() gives the port."""
    host = runtime.config.lan.bind
    port = runtime.ports.of(role)
    sock = bind_tcp(host, port, role=role, user_timeout_s=user_timeout_s)
    bound = sock.getsockname()[1]
    # hypercorn takes ownership of the descriptor and closes it when it stops.
    fd = sock.detach()
    cfg = hypercorn_config(runtime, fd)

    async def started_then_serve(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(app, cfg,  # type: ignore[arg-type]  # hypercorn's ASGI types are narrower than Starlette's
                    shutdown_trigger=runtime.stopping.wait, task_status=task_status)

    async with trio.open_nursery() as nursery:
        # If hypercorn fails before adopting the descriptor (the app's startup raised),
        # the error ends the process or the service restarts with a fresh bind; the
        # descriptor is not closed here because hypercorn may already own it.
        await nursery.start(started_then_serve)
        runtime.ports.bind(role, bound)
        log.info("listening on %s:%d for %s", host, bound, role)
        task_status.started(bound)


"""Checks that each LAN listener accepts connections, as a device on the LAN would see it."""

from __future__ import annotations

from collections.abc import Mapping

import trio

from appliance.protocol.health import Check, Status
from appliance.protocol.text import Text

__all__ = ["listener_checks"]

CONNECT_TIMEOUT_S = 2.0


async def _one(role: str, host: str, port: int) -> Check:
    target = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    name = f"lan.listener.{role}"
    try:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            stream = await trio.open_tcp_stream(target, port)
        await stream.aclose()
    except (OSError, trio.TooSlowError) as exc:
        # A port something drops (a firewall rule) times out, and TooSlowError has no text:
        # say so, for the homepage and for a failed firmware trial's reason (docs/updates.md).
        error = str(exc) if isinstance(exc, OSError) else f"no answer within {CONNECT_TIMEOUT_S:g} s"
        return Check(name=name, status=Status.FAIL,
                     message=Text("port {port} ({role}) does not accept connections: {error}", port=port,
                                  role=role, error=error),
                     fix=Text("see the services table on the homepage and the logs (journalctl -u appliance)"),
                     data={"port": port})
    return Check(name=name, status=Status.OK, message=Text("port {port} ({role}) accepts connections", port=port,
                                                           role=role), data={"port": port})


async def listener_checks(host: str, ports: Mapping[str, int]) -> list[Check]:
    results: dict[str, Check] = {}

    async def run(role: str, port: int) -> None:
        results[role] = await _one(role, host, port)

    async with trio.open_nursery() as nursery:
        for role, port in ports.items():
            nursery.start_soon(run, role, port)
    return [results[role] for role in ports]

"""The admin listener (port 80): the status homepage and its JSON twin, /api/status.

The homepage is plain HTML that works fully without JavaScript: a technician's phone or an
old POS browser shows it (the live-events section's small script only adds live updates).
Features contribute routes, homepage sections (HTML fragments) and keys of the
status JSON through :class:`~appliance.services.web.parts.WebParts`, assembled in
``appliance.services.assembly``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from appliance import __version__
from appliance.config import PORT_ROLES
from appliance.protocol.health import Check, Status, summary
from appliance.services.runtime import Runtime
from appliance.services.web.common import service_app
from appliance.services.web.kit import AMBER, GREEN, GREY, RED, TEXT, JsonResponse, page
from appliance.services.web.parts import WebParts

__all__ = ["create_app", "status"]

_STATE_COLOURS = {"running": GREEN, "starting": AMBER, "restarting": AMBER, "failed": RED, "disabled": GREY,
                  "stopped": GREY}

_CHECK_COLOURS = {Status.OK: GREEN, Status.WARN: AMBER, Status.FAIL: RED}


def uptime_text(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{s:02d}"


async def status(runtime: Runtime, parts: WebParts) -> dict[str, Any]:
    """What /api/status answers (and what the homepage shows)."""
    data: dict[str, Any] = {
        "appliance_id": runtime.appliance_id,
        "version": __version__,
        "uptime_s": round(runtime.uptime_s(), 1),
        "ports": dict(runtime.ports),
        "services": [s.as_dict() for s in runtime.board.all()],
        "ready": not runtime.board.not_ready(),
        "not_ready": runtime.board.not_ready(),
    }
    for part in parts.status:
        data.update(await part(runtime))
    return data


def _services_section(runtime: Runtime) -> str:
    rows = []
    for s in runtime.board.all():
        colour = _STATE_COLOURS.get(str(s.state), TEXT)
        note = s.last_error if s.last_error else s.detail
        rows.append(
            f"<tr><td>{html.escape(s.name)}{' <span class=muted>(core)</span>' if s.core else ''}</td>"
            f"<td class=state style='color:{colour}'>{html.escape(str(s.state))}</td>"
            f"<td>{s.crashes}</td><td>{html.escape(note)}</td></tr>"
        )
    return ("<section><h2>Services</h2><table><tr><th>service</th><th>state</th><th>crashes</th>"
            f"<th>note</th></tr>{''.join(rows)}</table></section>")


def _ports_section(runtime: Runtime) -> str:
    rows = []
    for role in PORT_ROLES:
        port = runtime.ports.of(role.role)
        rows.append(f"<tr><td>{port}/{role.transport}</td><td>{role.direction}</td>"
                    f"<td>{html.escape(role.description)}</td></tr>")
    return ("<section><h2>Ports</h2><table><tr><th>port</th><th>direction</th><th>service</th></tr>"
            f"{''.join(rows)}</table></section>")


def _health_section(checks: Sequence[Check]) -> str:
    counts = summary(checks)
    problems = [c for c in checks if c.status is not Status.OK]
    rows = "".join(
        f"<tr><td class=state style='color:{_CHECK_COLOURS[c.status]}'>{c.status}</td>"
        f"<td>{html.escape(c.name)}</td><td>{html.escape(c.message)}"
        + (f"<br><span class=muted>fix: {html.escape(c.fix)}</span>" if c.fix else "")
        + "</td></tr>"
        for c in problems
    )
    headline = (f"{counts['ok']} ok, {counts['warn']} warning(s), {counts['fail']} failing"
                + ("" if problems else ": nothing to do"))
    table = f"<table><tr><th>status</th><th>check</th><th>what and how to fix</th></tr>{rows}</table>" if rows else ""
    return f"<section><h2>Health</h2><p>{headline}</p>{table}</section>"


def create_app(runtime: Runtime, parts: WebParts) -> Starlette:
    async def homepage(request: Request) -> Response:
        not_ready = runtime.board.not_ready()
        state = "ready" if not not_ready else "not ready: " + "; ".join(not_ready)
        subtitle = (f"{runtime.appliance_id} · firmware {__version__} · up {uptime_text(runtime.uptime_s())}"
                    f" · {state}")
        extra = [await section(runtime) for section in parts.sections]
        health = _health_section(await runtime.health.latest())
        body = page("Store appliance", subtitle,
                    [health, _services_section(runtime), *extra, _ports_section(runtime)])
        return HTMLResponse(body)

    async def api_status(request: Request) -> Response:
        return JsonResponse(await status(runtime, parts))

    routes: list[BaseRoute] = [Route("/", homepage), Route("/api/status", api_status)]
    routes += parts.routes_for(runtime)
    return service_app("admin", runtime, routes)

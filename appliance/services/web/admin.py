"""The admin listener (port 80): the status homepage and its JSON twin, /api/status.

The homepage is plain HTML with no JavaScript: a technician's phone or an old POS browser
shows it. Features contribute routes, homepage sections (HTML fragments) and keys of the
status JSON through :class:`~appliance.services.web.parts.WebParts`, assembled in
``appliance.services.assembly``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from appliance import __version__
from appliance.config import PORT_ROLES
from appliance.protocol.health import Check, Status, summary
from appliance.services.runtime import Runtime
from appliance.services.web.common import service_app
from appliance.services.web.parts import WebParts

__all__ = ["create_app", "page", "status"]

_STATE_COLOURS = {"running": "#1a7f37", "starting": "#9a6700", "restarting": "#9a6700",
                  "failed": "#cf222e", "disabled": "#6e7781", "stopped": "#6e7781"}

_CHECK_COLOURS = {Status.OK: "#1a7f37", Status.WARN: "#9a6700", Status.FAIL: "#cf222e"}

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f8fa;color:#1f2328}
header{background:#0b3d61;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;opacity:.85;font-size:14px}
main{padding:16px 24px;display:grid;gap:16px;grid-template-columns:repeat(auto-fit,minmax(380px,1fr))}
section{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px 16px;overflow-x:auto;min-width:0}
h2{font-size:16px;margin:4px 0 10px}table{border-collapse:collapse;width:100%;font-size:14px}
td,th{text-align:left;padding:4px 6px;border-bottom:1px solid #eaeef2;vertical-align:top;overflow-wrap:break-word}
.state{font-weight:600}.muted{color:#6e7781}form{display:inline}button{font-size:13px}
"""


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


def page(title: str, subtitle: str, sections: Sequence[str]) -> str:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p></header>"
        f"<main>{''.join(sections)}</main></body></html>"
    )


def _services_section(runtime: Runtime) -> str:
    rows = []
    for s in runtime.board.all():
        colour = _STATE_COLOURS.get(str(s.state), "#1f2328")
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
        health = _health_section(await runtime.health.run_all())
        body = page("Store appliance", subtitle,
                    [health, _services_section(runtime), *extra, _ports_section(runtime)])
        return HTMLResponse(body)

    async def api_status(request: Request) -> Response:
        return JSONResponse(await status(runtime, parts))

    routes: list[BaseRoute] = [Route("/", homepage), Route("/api/status", api_status)]
    routes += parts.routes_for(runtime)
    return service_app("admin", runtime, routes)

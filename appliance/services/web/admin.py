"""The admin listener (port 80): the status homepage and its JSON twin, /api/status.

The homepage is plain HTML that works fully without JavaScript: a technician's phone or an
old POS browser shows it (the live-events section's small script only adds live updates).
It reads top to bottom as a status page: one headline sentence (can the shop
sell, take online orders, reach its devices; if not, the first thing to do), then what is
wrong with its fix in full width, then the rest.

Where a feature puts its part of the homepage: a ``Section`` in its
:class:`~appliance.services.web.parts.WebParts` (an async function given the runtime and
the request's translations ``_``, returning one :func:`~appliance.services.web.kit.card`),
hooked in ``appliance.services.assembly``; the parts appear after the problems, in
assembly order. Routes and keys of the status JSON come the same way.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any, Final

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from appliance import __version__
from appliance.config import DIRECTION_WORDS, PORT_ROLES
from appliance.protocol.admin_api import Status as StatusBody
from appliance.protocol.headline import headline, problems
from appliance.protocol.health import Check, Status, summary
from appliance.protocol.openapi import Operation, Reply
from appliance.protocol.text import Text, join, say
from appliance.services.i18n import Gettext, gettext_for, negotiate
from appliance.services.runtime import Runtime
from appliance.services.web.common import service_app
from appliance.services.web.contract import Documented, document_of, openapi_route
from appliance.services.web.kit import AMBER, GREEN, GREY, RED, SERVICE_STATE_WORDS, TEXT, JsonResponse, card, page
from appliance.services.web.parts import WebParts

__all__ = ["create_app", "status"]

_STATE_COLOURS = {"running": GREEN, "starting": AMBER, "restarting": AMBER, "failed": RED, "disabled": GREY,
                  "stopped": GREY}

_CHECK_COLOURS = {Status.OK: GREEN, Status.WARN: AMBER, Status.FAIL: RED}


def uptime_text(seconds: float) -> Text:
    """How long the box has run: "02:03:04", "3 d 02:03:04" (a Text: "3 j 02:03:04")."""
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    clock = f"{hours:02d}:{minutes:02d}:{s:02d}"
    return Text("{days} d {clock}", days=days, clock=clock) if days else Text(clock)


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


def _services_section(runtime: Runtime, _: Gettext) -> str:
    rows = []
    for s in runtime.board.all():
        colour = _STATE_COLOURS.get(str(s.state), TEXT)
        note = s.last_error if s.last_error else s.detail
        core = " <span class=muted>(" + html.escape(_("core")) + ")</span>" if s.core else ""
        rows.append(
            f"<tr><td>{html.escape(s.name)}{core}</td>"
            f"<td class=state style='color:{colour}'>{html.escape(say(SERVICE_STATE_WORDS.get(s.state, s.state), _))}"
            f"</td><td>{s.crashes}</td><td>{html.escape(say(note, _))}</td></tr>"
        )
    head = "".join(f"<th>{html.escape(h)}</th>" for h in (_("service"), _("state"), _("crashes"), _("note")))
    return card(_("Services"), f"<table><tr>{head}</tr>{''.join(rows)}</table>", anchor="services")


def _ports_section(runtime: Runtime, _: Gettext) -> str:
    rows = []
    for role in PORT_ROLES:
        port = runtime.ports.of(role.role)
        direction = say(DIRECTION_WORDS.get(role.direction, role.direction), _)
        rows.append(f"<tr><td>{port}/{role.transport}</td><td>{html.escape(direction)}</td>"
                    f"<td>{html.escape(say(role.description, _))}</td></tr>")
    head = "".join(f"<th>{html.escape(h)}</th>" for h in (_("port"), _("direction"), _("service")))
    return card(_("Ports"), f"<table><tr>{head}</tr>{''.join(rows)}</table>", anchor="ports")


def _headline_section(checks: Sequence[Check], _: Gettext) -> str:
    """The sentence at the top: can the shop sell, take online orders, reach its devices,
    and the first thing to do. Announced to screen readers as the page's status."""
    top = headline(checks, _)
    first_word, label = html.escape(_("First:")), html.escape(_("Shop status"))
    first = f"<p class=first><strong>{first_word}</strong> {html.escape(top.first_fix)}</p>" if top.first_fix else ""
    return (f"<section class='wide headline {top.status}' role=status aria-label='{label}'>"
            f"<p><strong>{html.escape(top.sentence)}</strong></p>{first}</section>")


def _problems_section(checks: Sequence[Check], _: Gettext) -> str:
    """What is wrong, each with its fix, failures first, in full width ("" when nothing is)."""
    wrong = [c.in_language(_) for c in problems(checks)]
    if not wrong:
        return ""
    words = {Status.WARN: _("warn"), Status.FAIL: _("fail")}
    fix = html.escape(_("Fix:"))
    items = "".join(
        f"<li><span class=tag style='color:{_CHECK_COLOURS[c.status]}'>{words[c.status]}</span> "
        f"<span class=what>{html.escape(c.message)}</span> <span class=muted>({html.escape(c.name)})</span>"
        + (f"<span class=fix>{fix} {html.escape(c.fix)}</span>" if c.fix else "")
        + "</li>"
        for c in wrong
    )
    title = html.escape(_("What is wrong, and how to fix it"))
    return f"<section id=problems class='wide problems'><h2>{title}</h2><ul>{items}</ul></section>"


def _checks_section(runtime: Runtime, checks: Sequence[Check], _: Gettext) -> str:
    counts = summary(checks)
    words = _("{ok} ok, {warn} warning(s), {fail} failing. Every check, as JSON: {url}; on the box: {command}.")
    body = "<p>" + html.escape(words).format(
        ok=counts["ok"], warn=counts["warn"], fail=counts["fail"],
        url=f"<code>http://&lt;box&gt;:{runtime.ports.of('ops')}/health</code>",
        command="<code>appliance health</code>") + "</p>"
    return card(_("Health checks"), body, anchor="health")


def create_app(runtime: Runtime, parts: WebParts) -> Starlette:
    async def homepage(request: Request) -> Response:
        lang = negotiate(request.headers.get("accept-language"))
        _ = gettext_for(lang)
        not_ready = runtime.board.not_ready()
        state = _("ready") if not not_ready else _("not ready: {what}").format(what=say(join("; ", not_ready), _))
        subtitle = _("{box} · firmware {version} · up {uptime} · {state}").format(
            box=runtime.appliance_id, version=__version__, uptime=say(uptime_text(runtime.uptime_s()), _), state=state)
        checks = await runtime.health.latest()
        # The order is the reading order: the headline, what is wrong in full width, then
        # the rest: each feature's own part (WebParts.sections, in assembly order), then
        # the box's services, checks and ports.
        parts_html = [await section(runtime, _) for section in parts.sections]
        body = page(_("Store appliance"), subtitle,
                    [_headline_section(checks, _), _problems_section(checks, _), *parts_html,
                     _services_section(runtime, _), _checks_section(runtime, checks, _), _ports_section(runtime, _)],
                    lang=lang)
        return HTMLResponse(body, headers={"Content-Language": lang, "Vary": "Accept-Language"})

    async def api_status(request: Request) -> Response:
        return JsonResponse(await status(runtime, parts))

    routes: list[BaseRoute] = [Route("/", homepage), Documented("/api/status", api_status, method="GET",
                                                                operation=_STATUS)]
    routes += parts.routes_for(runtime)
    # The JSON routes' own document, built once from their operations and bodies.
    doc = document_of(routes, title="Store appliance: admin JSON routes", description=DESCRIPTION)
    return service_app("admin", runtime, [*routes, openapi_route(OPENAPI_PATH, doc)])


OPENAPI_PATH: Final = "/api/openapi.json"
DESCRIPTION: Final = ("The store appliance's admin listener (port 80): the JSON routes under /api for scripts and "
                      "the platform's tools, beside the homepage. Changes need the admin token. Errors are JSON "
                      "{error, errors}; see docs/store-api.md.")
_STATUS: Final = Operation(summary="The box at a glance (open: the homepage shows the same)", tag="status",
                           replies=(Reply(status=200, description="the status", body=StatusBody),))

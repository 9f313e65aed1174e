"""Online orders and the remote support channel on the listeners.

Store API (port 8000):

- ``GET /v1/orders?limit=N&source=online|device`` (admin token): the newest orders, online
  ones (Service Bus) and those devices posted (``POST /v1/orders``), merged by time.
Admin listener (port 80): homepage sections "Online orders" and "Remote support",
``/api/status`` keys ``orders`` and ``support``, and ``POST /api/support-channel``
``{"enabled": true|false}`` (admin token) to switch the support channel on for
``[support] duration_s`` or off.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from datetime import datetime
from functools import partial
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from appliance.protocol.admin_api import SupportAnswer, SupportSwitch
from appliance.protocol.openapi import Operation, Param, Reply
from appliance.protocol.store_api import OnlineOrderList
from appliance.protocol.text import Number, Text, say
from appliance.services.i18n import Gettext
from appliance.services.runtime import Runtime
from appliance.services.state import QueueLinkStatus, QueuePhase
from appliance.services.support_channel import switch_support
from appliance.services.timestamps import rfc3339
from appliance.services.web.common import (
    ApiError,
    FormError,
    check_form_token,
    read_form,
    read_json,
    require_admin,
    whole_number,
)
from appliance.services.web.contract import ADMIN, Documented, errors
from appliance.services.web.kit import (
    AMBER,
    COMMAND_STATE_WORDS,
    GREEN,
    LINK_PHASE_WORDS,
    RED,
    JsonResponse,
    not_done,
    row,
)
from appliance.services.web.parts import WebParts
from appliance.storage.orders import LIST_MAX, list_orders, order_counts

__all__ = ["admin_parts", "api_parts"]

LIST_DEFAULT: Final = 50
RECENT_SHOWN: Final = 5
_PHASE_COLOURS: Final = {QueuePhase.CONNECTED: GREEN, QueuePhase.CONNECTING: AMBER, QueuePhase.RETRYING: AMBER,
                         QueuePhase.UNCONFIGURED: AMBER, QueuePhase.AUTH_FAILED: RED, QueuePhase.CONFIG_ERROR: RED}


def api_routes(runtime: Runtime) -> Sequence[BaseRoute]:
    db = runtime.db

    async def listing(request: Request) -> Response:
        require_admin(request, runtime)
        raw = request.query_params.get("limit", str(LIST_DEFAULT))
        limit = whole_number(raw, 1, LIST_MAX)
        if limit is None:
            raise ApiError(400, f"limit must be an integer from 1 to {LIST_MAX}, got {raw!r:.40}")
        source = request.query_params.get("source", "")
        if source not in ("", "online", "device"):
            raise ApiError(400, f"source must be online or device, got {source!r}")
        orders = await db.read(partial(list_orders, limit=limit, source=source))
        for order in orders:
            order["received_at"] = rfc3339(order["received_at"])
        return JsonResponse({"orders": orders})

    # GET /v1/orders/{id} is the store API's (appliance.services.web.store): it answers for
    # online orders and devices' orders alike.
    return [Documented("/v1/orders", listing, method="GET", operation=_LIST)]


_SUPPORT: Final = Operation(
    summary="Switch the remote support channel on (for [support] duration_s) or off", tag="support",
    body=SupportSwitch,
    replies=(Reply(status=200, description="switched", body=SupportAnswer), *errors(400, 401, 408, 413)),
    security=(ADMIN,))
_LIST: Final = Operation(
    summary="The newest orders, online and from devices, newest first", tag="records",
    params=(Param(name="limit", where="query", description="at most this many",
                  schema={"type": "integer", "minimum": 1, "maximum": LIST_MAX, "default": LIST_DEFAULT}),
            Param(name="source", where="query", description="only orders from here",
                  schema={"type": "string", "enum": ["online", "device"]})),
    replies=(Reply(status=200, description="the orders", body=OnlineOrderList), *errors(400, 401)),
    security=(ADMIN,))


def admin_routes(runtime: Runtime) -> Sequence[BaseRoute]:
    async def switch(request: Request) -> Response:
        require_admin(request, runtime)
        body = await read_json(request, 1024)
        enabled = body.get("enabled") if isinstance(body, dict) else None
        if not isinstance(enabled, bool) or set(body) != {"enabled"}:
            raise ApiError(400, 'expected {"enabled": true} or {"enabled": false}')
        window = await switch_support(runtime, enabled)
        return JsonResponse({"support": window.describe(), "until": window.until_wall})

    async def switch_form(request: Request) -> Response:
        """The homepage buttons (no JavaScript: a form with the admin token)."""
        try:
            form = await read_form(request)
            check_form_token(form, runtime, consequence=Text("the support channel was not changed"))
            action = form.get("action", "")
            if action not in ("on", "off"):
                raise FormError(400, Text("Unknown action {action}; the support channel was not changed.",
                                          action=repr(action)))
        except FormError as exc:
            return not_done(request, exc.status, exc.message, subtitle=Text("remote support"),
                            anchor="support-channel")
        await switch_support(runtime, action == "on")
        return RedirectResponse("/#support-channel", status_code=303)

    return [Documented("/api/support-channel", switch, method="POST", operation=_SUPPORT),
            Route("/support-channel/action", switch_form, methods=["POST"])]


def _link_rows(state: QueueLinkStatus, _: Gettext) -> list[str]:
    esc = html.escape
    words = {QueuePhase.CONNECTED: Text("connected to {namespace}", namespace=state.namespace),
             QueuePhase.CONNECTING: LINK_PHASE_WORDS["connecting"],
             QueuePhase.UNCONFIGURED: Text("waiting: {reason}", reason=state.detail),
             QueuePhase.RETRYING: Text("cannot connect; retrying"),
             QueuePhase.AUTH_FAILED: Text("the namespace refused the key: check the pairing"),
             QueuePhase.CONFIG_ERROR: Text("the settings cannot work"), QueuePhase.OFF: Text("off")}
    rows = [row(_("link"), esc(say(words[state.phase], _)), _PHASE_COLOURS.get(state.phase, ""))]
    if state.queue:
        rows.append(row(_("queue"), esc(_("{queue} on {namespace}").format(queue=state.queue,
                                                                         namespace=state.namespace))))
    if state.phase is not QueuePhase.CONNECTED and state.last_error:
        rows.append(row(_("last error"), esc(say(state.last_error, _)), RED))
        if state.next_try_at:
            rows.append(row(_("next try"), esc(_("in {seconds} s").format(
                seconds=max(0, int(state.next_try_at - time.time()))))))
    return rows


def _clock(at: float) -> str:
    """A time of today as the shop's clock shows it (24 h, both languages)."""
    return datetime.fromtimestamp(at).strftime("%H:%M:%S")


async def orders_section(runtime: Runtime, _: Gettext) -> str:
    t_off_orders_enabled_false = _("off ([orders] enabled = false)")
    esc = html.escape
    state = runtime.orders_link
    title = esc(_("Online orders"))
    if not runtime.config.orders.enabled:
        return (f"<section id=orders><h2>{title}</h2><p class=muted>{esc(t_off_orders_enabled_false)}</p>"
                "</section>")
    rows = _link_rows(state, _)
    counts = await runtime.db.read(order_counts)
    kept, received = say(Number(counts["online_orders"]), _), say(Number(state.received), _)
    words = (_("{kept} kept · {received} messages since start").format(kept=kept, received=received)
             if state.last_message_at is None else
             _("{kept} kept · {received} messages since start · last at {last}").format(
                 kept=kept, received=received, last=_clock(state.last_message_at)))
    rows.append(row(_("orders"), esc(words)))
    if state.dead_lettered:
        rows.append(row(_("not valid"), esc(_("{count} dead-lettered since start").format(
            count=say(Number(state.dead_lettered), _))), AMBER))
    recent = await runtime.db.read(partial(list_orders, limit=RECENT_SHOWN, source="online"))

    def delivery(order: dict[str, Any]) -> str:
        return ", ".join(f"{c['device_id']}: {say(COMMAND_STATE_WORDS.get(c['state'], c['state']), _)}"
                         for c in order["commands"]) or _("no device")

    items = "".join(f"<tr><td>{esc(o['id'])}</td><td>{esc(_clock(o['received_at']))}</td>"
                    f"<td>{esc(delivery(o))}</td></tr>" for o in recent)
    head = "".join(f"<th>{esc(h)}</th>" for h in (_("order"), _("at"), _("devices")))
    table = f"<table><tr>{head}</tr>{items}</table>" if items else ""
    return f"<section id=orders><h2>{title}</h2><table>{''.join(rows)}</table>{table}</section>"


async def support_section(runtime: Runtime, _: Gettext) -> str:
    t_remote_support = _("Remote support")
    t_admin_token = _("Admin token")
    t_switch_off = _("Switch off")
    t_allow_remote_support_for = _("Allow remote support for {hours} h")
    esc = html.escape
    window = runtime.support_window
    until = window.until_wall
    words = (_("enabled until {time}").format(time=datetime.fromtimestamp(until).strftime("%H:%M"))
             if window.is_open and until is not None else _("off"))
    rows = [row(_("remote support"), esc(words), AMBER if window.is_open else "")]
    if window.is_open:
        rows += _link_rows(runtime.support_link, _)
    hours = say(Number(runtime.config.support.duration_s / 3600, 1), _)
    button = (f"<button name=action value=off>{esc(t_switch_off)}</button>" if window.is_open else
              f"<button name=action value=on>{esc(t_allow_remote_support_for.format(hours=hours))}"
              "</button>")
    api = esc(_("or {request} with the admin token")).format(
        request='POST /api/support-channel {"enabled": true}')
    return (f"<section id=support-channel><h2>{esc(t_remote_support)}</h2><table>{''.join(rows)}</table>"
            f"<form method=post action='/support-channel/action'><p><label>{esc(t_admin_token)} "
            f"<input type=password name=token autocomplete=current-password required></label> {button}</p></form>"
            f"<p class=muted>{api}</p></section>")


async def status_part(runtime: Runtime) -> dict[str, Any]:
    window = runtime.support_window
    return {"orders": {"enabled": runtime.config.orders.enabled, **runtime.orders_link.as_dict()},
            "support": {"window": window.describe(), "until": window.until_wall,
                        **runtime.support_link.as_dict()}}


def api_parts() -> WebParts:
    return WebParts(routes=(api_routes,))


def admin_parts() -> WebParts:
    return WebParts(routes=(admin_routes,), sections=(orders_section, support_section), status=(status_part,))

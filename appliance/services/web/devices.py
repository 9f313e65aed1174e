"""The device registry on the admin listener (port 80): JSON routes, form routes, a homepage section.

JSON (for scripts and the platform's tools):

- ``GET /api/devices``: every device and its adoption state (no token: the homepage shows
  the same);
- ``POST /api/devices/{id}/adopt`` and ``/reject``: ``Authorization: Bearer <admin token>``.

The homepage has no JavaScript, and an HTML form cannot send an ``Authorization`` header.
Its buttons therefore post one form, ``POST /devices/action``, that carries the admin
token as a password field next to the buttons (``action=adopt:<id>``). Chosen over a
login cookie: there is no session to store, expire or steal, and no cross-site request
can forge the form since no other site knows the token (a cookie would need CSRF tokens
on a page that, per the seed, is plain HTTP). The browser's password manager fills it.
Port 80 is plain HTTP on the shop LAN, so the token crosses the LAN in clear either way.

Every change notifies ``runtime.device_changes`` (the dispatcher starts or stops pushing).
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from functools import partial
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from appliance.services.runtime import Runtime
from appliance.services.web.common import ApiError, FormError, check_form_token, read_form, require_admin
from appliance.services.web.kit import AMBER, GREEN, GREY, JsonResponse, ago, not_done
from appliance.services.web.parts import WebParts
from appliance.storage.devices import (
    AdoptionState,
    DeclaredInConfig,
    Device,
    DeviceSource,
    UnknownDevice,
    get_device,
    list_devices,
    set_state,
)

__all__ = ["admin_parts", "devices_section", "devices_status", "routes"]

_ACTIONS: Final = {"adopt": AdoptionState.ADOPTED, "reject": AdoptionState.REJECTED}


async def _change(runtime: Runtime, device_id: str, state: AdoptionState) -> tuple[Device, bool]:
    device, changed = await runtime.db.write(partial(set_state, device_id=device_id, state=state, now=time.time()))
    if changed:
        runtime.device_changes.notify()
    return device, changed


def routes(runtime: Runtime) -> Sequence[BaseRoute]:
    async def api_list(request: Request) -> Response:
        devices = await runtime.db.read(list_devices)
        return JsonResponse({"devices": [d.as_dict() for d in devices]})

    async def api_one(request: Request) -> Response:
        device_id = request.path_params["device_id"]
        device = await runtime.db.read(partial(get_device, device_id=device_id))
        if device is None:
            raise ApiError(404, f"no device {device_id!r} in the registry")
        return JsonResponse({"device": device.as_dict()})

    async def api_action(request: Request) -> Response:
        require_admin(request, runtime)
        device_id, verb = request.path_params["device_id"], request.path_params["verb"]
        if verb not in _ACTIONS:
            raise ApiError(404, f"unknown action {verb!r}: adopt or reject")
        try:
            device, changed = await _change(runtime, device_id, _ACTIONS[verb])
        except UnknownDevice as exc:
            raise ApiError(404, str(exc)) from exc
        except DeclaredInConfig as exc:
            raise ApiError(409, str(exc)) from exc
        return JsonResponse({"device": device.as_dict(), "changed": changed})

    async def form_action(request: Request) -> Response:
        try:
            form = await read_form(request)
            check_form_token(form, runtime, consequence="nothing was changed")
            action = form.get("action", "")
            verb, _, device_id = action.partition(":")
            if verb not in _ACTIONS or not device_id:
                raise FormError(400, f"Unknown action {action!r}; nothing was changed.")
            try:
                await _change(runtime, device_id, _ACTIONS[verb])
            except UnknownDevice as exc:
                raise FormError(404, f"{exc}; nothing was changed.") from exc
            except DeclaredInConfig as exc:
                raise FormError(409, f"{exc}.") from exc
        except FormError as exc:
            return not_done(exc.status, exc.message, subtitle="device adoption", anchor="devices")
        return RedirectResponse("/#devices", status_code=303)

    return [
        Route("/api/devices", api_list, methods=["GET"]),
        Route("/api/devices/{device_id}", api_one, methods=["GET"]),
        Route("/api/devices/{device_id}/{verb}", api_action, methods=["POST"]),
        Route("/devices/action", form_action, methods=["POST"]),
    ]


_STATE_COLOURS: Final = {AdoptionState.ADOPTED: GREEN, AdoptionState.PENDING: AMBER, AdoptionState.REJECTED: GREY}


def _buttons(device: Device) -> str:
    if device.source is DeviceSource.CONFIG:
        return "<span class=muted>declared in config</span>"
    value = html.escape(device.id, quote=True)
    out = []
    if device.state is not AdoptionState.ADOPTED:
        out.append(f"<button name=action value='adopt:{value}'>Adopt</button>")
    if device.state is not AdoptionState.REJECTED:
        out.append(f"<button name=action value='reject:{value}'>Reject</button>")
    return " ".join(out)


async def devices_section(runtime: Runtime) -> str:
    """The homepage's Devices section: every device, its state, and adopt/reject buttons."""
    devices = await runtime.db.read(list_devices)
    now = time.time()
    rows = []
    for d in devices:
        seen = None if d.last_seen is None else now - d.last_seen
        rows.append(
            f"<tr><td>{html.escape(d.name or d.id)}<br><span class=muted>{html.escape(d.id)}</span></td>"
            f"<td>{html.escape(d.kind)}</td><td>{html.escape(d.address)}:{d.port}</td>"
            f"<td class=state style='color:{_STATE_COLOURS[d.state]}'>{d.state}</td>"
            f"<td>{ago(seen)}</td><td>{_buttons(d)}</td></tr>"
        )
    discovery = runtime.config.discovery
    port = runtime.ports.of("discovery")
    how = (f"Devices appear here when they probe on udp/{port}." if discovery.enabled
           else "Discovery is off ([discovery] enabled = false): declare devices in [[devices]].")
    if not rows:
        return (f"<section id=devices><h2>Devices</h2><p class=muted>No device yet. {how}</p></section>")
    return (
        "<section id=devices><h2>Devices</h2>"
        "<form method=post action='/devices/action' style='display:block'>"
        "<table><tr><th>device</th><th>kind</th><th>address</th><th>state</th><th>last seen</th><th></th></tr>"
        f"{''.join(rows)}</table>"
        "<p><label>Admin token <input type=password name=token autocomplete=current-password required></label>"
        " <span class=muted>needed to adopt or reject</span></p></form>"
        f"<p class=muted>{how} The box pushes commands to adopted devices only.</p></section>"
    )


async def devices_status(runtime: Runtime) -> dict[str, Any]:
    """The ``devices`` key of /api/status: how many devices are in each state."""
    devices = await runtime.db.read(list_devices)
    counts = {str(s): 0 for s in AdoptionState}
    for d in devices:
        counts[str(d.state)] += 1
    return {"devices": counts}


def admin_parts() -> WebParts:
    return WebParts(routes=(routes,), sections=(devices_section,), status=(devices_status,))

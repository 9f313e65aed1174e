"""The device registry on the admin listener (port 80): JSON routes, form routes, a homepage section.

JSON (for scripts and the platform's tools):

- ``GET /api/devices``: every device and its adoption state (no token: the homepage shows
  the same), with its enrollment waiting for a decision, if any;
- ``POST /api/devices/{id}/{verb}``, ``Authorization: Bearer <admin token>``, verbs:
  ``adopt`` (body ``{"code": "123456"}`` when the device enrolled: the comparison code the
  manager checked on the device's screen; the box adopts the key that code belongs to,
  and refuses if the device enrolled again meanwhile), ``reject``, ``revoke`` (an adopted
  device: its key is dropped and its open streams closed at once), ``dismiss`` (forget an
  enrollment, the device unchanged) and ``end-legacy`` (a device adopted before
  enrollment existed gets no more commands until it enrolls).

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
import sqlite3
import time
from collections.abc import Sequence
from functools import partial
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from appliance.protocol.admin_api import DeviceAction, DeviceAnswer, DeviceChange, DeviceList
from appliance.protocol.openapi import Operation, Reply
from appliance.services.i18n import Gettext
from appliance.services.runtime import Runtime
from appliance.services.web.common import ApiError, FormError, check_form_token, read_form, read_json, require_admin
from appliance.services.web.contract import ADMIN, Documented, errors, path_param
from appliance.services.web.kit import AMBER, GREEN, GREY, JsonResponse, ago, not_done
from appliance.services.web.parts import WebParts
from appliance.storage.devices import (
    AdoptionState,
    DeclaredInConfig,
    Device,
    DeviceSource,
    UnknownDevice,
    end_legacy,
    get_device,
    list_devices,
    set_state,
)
from appliance.storage.enrollments import (
    Enrollment,
    EnrollmentChanged,
    accept,
    dismiss,
    get_enrollment,
    list_enrollments,
)

__all__ = ["admin_parts", "devices_section", "devices_status", "key_status", "routes"]

_VERBS: Final = ("adopt", "reject", "revoke", "dismiss", "end-legacy")


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _act(conn: sqlite3.Connection, device_id: str, verb: str, code: str | None, now: float) -> tuple[Device, bool]:
    """One admin action, in one transaction. Raises RegistryError or _Refused."""
    device = get_device(conn, device_id)
    if device is None:
        raise UnknownDevice(f"no device {device_id!r} in the registry")
    if verb == "adopt":
        enrollment = get_enrollment(conn, device_id)
        if enrollment is not None and enrollment.code is not None:
            if code is None:
                raise _Refused(409, f"device {device_id!r} enrolled with a key: give the comparison code you checked "
                                    "on its screen ({\"code\": \"123456\"})")
            return accept(conn, device_id, code, now), True
        return set_state(conn, device_id, AdoptionState.ADOPTED, now)
    if verb == "revoke" and device.state is not AdoptionState.ADOPTED:
        raise _Refused(409, f"device {device_id!r} is {device.state}, not adopted: nothing to revoke")
    if verb in ("reject", "revoke"):
        return set_state(conn, device_id, AdoptionState.REJECTED, now)
    if verb == "dismiss":
        return device, dismiss(conn, device_id)
    return device, bool(end_legacy(conn, device_id, now))


async def _change(runtime: Runtime, device_id: str, verb: str, code: str | None) -> tuple[Device, bool]:
    device, changed = await runtime.db.write(partial(_act, device_id=device_id, verb=verb, code=code,
                                                     now=time.time()))
    if changed:
        # Whatever was trusted of this device (its key, its open streams) is re-read now.
        runtime.keys.forget(device_id)
        runtime.device_changes.notify()
    return device, changed


def _code_of(data: Any) -> str | None:
    if data is None:
        return None
    code = data.get("code") if isinstance(data, dict) else None
    if not isinstance(code, str) or len(code) != 6 or not code.isdigit():
        raise ApiError(400, 'expected no body, or {"code": "<the 6 digits shown on the device>"}')
    return code


def routes(runtime: Runtime) -> Sequence[BaseRoute]:
    async def api_list(request: Request) -> Response:
        devices, enrollments = await runtime.db.read(_devices_and_enrollments)
        return JsonResponse({"devices": [_with_enrollment(runtime, d, enrollments.get(d.id)) for d in devices]})

    async def api_one(request: Request) -> Response:
        device_id = request.path_params["device_id"]
        device = await runtime.db.read(partial(get_device, device_id=device_id))
        if device is None:
            raise ApiError(404, f"no device {device_id!r} in the registry")
        enrollment = await runtime.db.read(partial(get_enrollment, device_id=device_id))
        return JsonResponse({"device": _with_enrollment(runtime, device, enrollment)})

    async def api_action(request: Request) -> Response:
        require_admin(request, runtime)
        device_id, verb = request.path_params["device_id"], request.path_params["verb"]
        if verb not in _VERBS:
            raise ApiError(404, f"unknown action {verb!r}: {', '.join(_VERBS)}")
        has_body = request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers
        code = _code_of(await read_json(request, 1024) if has_body else None)
        try:
            device, changed = await _change(runtime, device_id, verb, code)
        except UnknownDevice as exc:
            raise ApiError(404, str(exc)) from exc
        except (DeclaredInConfig, EnrollmentChanged) as exc:
            raise ApiError(409, str(exc)) from exc
        except _Refused as exc:
            raise ApiError(exc.status, exc.message) from exc
        return JsonResponse({"device": device.as_dict(), "changed": changed})

    async def form_action(request: Request) -> Response:
        try:
            form = await read_form(request)
            check_form_token(form, runtime, consequence="nothing was changed")
            action = form.get("action", "")
            verb, _, device_id = action.partition(":")
            verb, _, code = verb.partition("@")  # adopt@123456:<id>: the code the page showed
            if verb not in _VERBS or not device_id:
                raise FormError(400, f"Unknown action {action!r}; nothing was changed.")
            try:
                await _change(runtime, device_id, verb, code or None)
            except UnknownDevice as exc:
                raise FormError(404, f"{exc}; nothing was changed.") from exc
            except (DeclaredInConfig, EnrollmentChanged) as exc:
                raise FormError(409, f"{exc}; nothing was changed.") from exc
            except _Refused as exc:
                raise FormError(exc.status, f"{exc.message}; nothing was changed.") from exc
        except FormError as exc:
            return not_done(exc.status, exc.message, subtitle="device adoption", anchor="devices")
        return RedirectResponse("/#devices", status_code=303)

    return [
        Documented("/api/devices", api_list, method="GET", operation=Operation(
            summary="Every device and its adoption state (open: the homepage shows the same)", tag="devices",
            replies=(Reply(status=200, description="the devices", body=DeviceList),))),
        Documented("/api/devices/{device_id}", api_one, method="GET", operation=Operation(
            summary="One device", tag="devices", params=(path_param("device_id", "the device's id"),),
            replies=(Reply(status=200, description="the device", body=DeviceAnswer),
                     *errors(404, e404="no such device in the registry")))),
        Documented("/api/devices/{device_id}/{verb}", api_action, method="POST", operation=Operation(
            summary="Adopt, reject, revoke, dismiss or end-legacy a device", tag="devices",
            description="adopt: a device that enrolled with a key needs the comparison code checked on its screen "
                        "({\"code\": \"123456\"}); the other verbs take no body.",
            params=(path_param("device_id", "the device's id"),
                    path_param("verb", "what to do", enum=list(_VERBS))),
            body=DeviceAction, body_required=False,
            replies=(Reply(status=200, description="done (or nothing to change)", body=DeviceChange),
                     *errors(400, 401, 404, 408, 409, 413, e404="no such device, or no such verb",
                             e409="declared in the configuration, enrolled again meanwhile, or not adopted")),
            security=(ADMIN,))),
        Route("/devices/action", form_action, methods=["POST"]),
    ]


_STATE_COLOURS: Final = {AdoptionState.ADOPTED: GREEN, AdoptionState.PENDING: AMBER, AdoptionState.REJECTED: GREY}


def _devices_and_enrollments(conn: sqlite3.Connection) -> tuple[list[Device], dict[str, Enrollment]]:
    return list_devices(conn), list_enrollments(conn)


def key_status(runtime: Runtime, device: Device) -> tuple[str, bool]:
    """(what the box holds to authenticate ``device``, in words; whether it gets commands)."""
    if device.source is DeviceSource.CONFIG:
        if runtime.keys.key_of(device) is not None:
            return "pre-shared key (config)", True
        return "no key: set key in its [[devices]] entry (appliance device-key); it gets no commands", False
    if device.public_key is not None:
        return "enrolled key", True
    if device.legacy:
        return ("no key yet (adopted before enrollment): commands go unauthenticated until it enrolls "
                "or you end that"), True
    return "no key: it gets no commands until it enrolls", False


def _with_enrollment(runtime: Runtime, device: Device, enrollment: Enrollment | None) -> dict[str, Any]:
    words, commands = key_status(runtime, device)
    out = {**device.as_dict(), "key": words, "gets_commands": device.state is AdoptionState.ADOPTED and commands}
    out["enrollment"] = None if enrollment is None else {
        **enrollment.as_dict(), "replaces": device.public_key is not None or device.state is AdoptionState.ADOPTED}
    return out


def _buttons(device: Device, enrollment: Enrollment | None) -> str:
    if device.source is DeviceSource.CONFIG:
        return "<span class=muted>declared in config</span>"
    value = html.escape(device.id, quote=True)
    out = []
    if enrollment is not None and enrollment.code is not None:
        label = "Accept new key" if device.state is AdoptionState.ADOPTED else "Adopt"
        out.append(f"<button name=action value='adopt@{enrollment.code}:{value}'>{label}</button>")
        out.append(f"<button name=action value='dismiss:{value}'>Dismiss</button>")
    elif device.state is not AdoptionState.ADOPTED:
        out.append(f"<button name=action value='adopt:{value}'>Adopt</button>")
    if device.state is AdoptionState.ADOPTED:
        out.append(f"<button name=action value='revoke:{value}'>Revoke</button>")
        if device.legacy:
            out.append(f"<button name=action value='end-legacy:{value}'>Require enrollment</button>")
    elif device.state is not AdoptionState.REJECTED:
        out.append(f"<button name=action value='reject:{value}'>Reject</button>")
    return " ".join(out)


def _enrollment_note(device: Device, enrollment: Enrollment | None) -> str:
    if enrollment is None:
        return ""
    esc = html.escape
    if enrollment.code is None:
        return "<br><span class=muted>enrolling (no code yet)</span>"
    code = f"{enrollment.code[:3]}&nbsp;{enrollment.code[3:]}"
    replaces = device.public_key is not None or device.state is AdoptionState.ADOPTED
    what = f"wants to replace device {esc(device.id)}'s key" if replaces else "enrolled"
    return (f"<br><strong>{what}</strong> from {esc(enrollment.address)}: code <strong class=code>{code}</strong>"
            " <span class=muted>(adopt only if the device shows the same code)</span>")


async def devices_section(runtime: Runtime, _: Gettext) -> str:
    """The homepage's Devices section: every device, its state, and adopt/reject buttons."""
    devices, enrollments = await runtime.db.read(_devices_and_enrollments)
    now = time.time()
    rows = []
    for d in devices:
        # Heard from by any path: its discovery probe, or the device channel (connected, an
        # ack), so this table never says "never" for a device the links table shows connected.
        link = runtime.device_links.links.get(d.id)
        heard = [t for t in (d.last_seen, link and link.connected_since, link and link.last_ack_at) if t]
        seen = now - max(heard) if heard else None
        enrollment = enrollments.get(d.id)
        came = "came from " if d.state is AdoptionState.PENDING else ""
        key_words, _pushes = key_status(runtime, d)
        rows.append(
            f"<tr><td>{html.escape(d.name or d.id)}<br><span class=muted>{html.escape(d.id)}</span></td>"
            f"<td>{html.escape(d.kind)}</td><td>{came}{html.escape(d.address)}:{d.port}</td>"
            f"<td class=state style='color:{_STATE_COLOURS[d.state]}'>{d.state}</td>"
            f"<td>{html.escape(key_words)}{_enrollment_note(d, enrollment)}</td>"
            f"<td>{ago(seen)}</td><td>{_buttons(d, enrollment)}</td></tr>"
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
        "<table><tr><th>device</th><th>kind</th><th>address</th><th>state</th><th>key</th><th>last seen</th><th></th>"
        "</tr>"
        f"{''.join(rows)}</table>"
        "<p><label>Admin token <input type=password name=token autocomplete=current-password required></label>"
        " <span class=muted>needed to adopt, reject or revoke</span></p></form>"
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

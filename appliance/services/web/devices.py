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
from appliance.protocol.text import Text, say
from appliance.services.i18n import Gettext
from appliance.services.runtime import Runtime
from appliance.services.web.common import ApiError, FormError, check_form_token, read_form, read_json, require_admin
from appliance.services.web.contract import ADMIN, Documented, errors, path_param
from appliance.services.web.kit import AMBER, DEVICE_STATE_WORDS, GREEN, GREY, KIND_WORDS, JsonResponse, ago, not_done
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
        raise UnknownDevice(Text("no device {device} in the registry", device=repr(device_id)))
    if verb == "adopt":
        enrollment = get_enrollment(conn, device_id)
        if enrollment is not None and enrollment.code is not None:
            if code is None:
                raise _Refused(409, Text("device {device} enrolled with a key: give the comparison code you "
                                         "checked on its screen ({example})", device=repr(device_id),
                                         example='{"code": "123456"}'))
            return accept(conn, device_id, code, now), True
        return set_state(conn, device_id, AdoptionState.ADOPTED, now)
    if verb == "revoke" and device.state is not AdoptionState.ADOPTED:
        raise _Refused(409, Text("device {device} is {state}, not adopted: nothing to revoke",
                                 device=repr(device_id), state=DEVICE_STATE_WORDS[device.state]))
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


def _nothing_changed(reason: str) -> Text:
    return Text("{reason}; nothing was changed.", reason=reason)


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
            check_form_token(form, runtime, consequence=Text("nothing was changed"))
            action = form.get("action", "")
            verb, _, device_id = action.partition(":")
            verb, _, code = verb.partition("@")  # adopt@123456:<id>: the code the page showed
            if verb not in _VERBS or not device_id:
                raise FormError(400, Text("Unknown action {action}; nothing was changed.", action=repr(action)))
            try:
                await _change(runtime, device_id, verb, code or None)
            except UnknownDevice as exc:
                raise FormError(404, _nothing_changed(exc.args[0])) from exc
            except (DeclaredInConfig, EnrollmentChanged) as exc:
                raise FormError(409, _nothing_changed(str(exc))) from exc
            except _Refused as exc:
                raise FormError(exc.status, _nothing_changed(exc.message)) from exc
        except FormError as exc:
            return not_done(request, exc.status, exc.message, subtitle=Text("device adoption"), anchor="devices")
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


def key_status(runtime: Runtime, device: Device) -> tuple[Text, bool]:
    """(what the box holds to authenticate ``device``, in words; whether it gets commands)."""
    if device.source is DeviceSource.CONFIG:
        if runtime.keys.key_of(device) is not None:
            return Text("pre-shared key (config)"), True
        return Text("no key: set key in its [[devices]] entry (appliance device-key); it gets no commands"), False
    if device.public_key is not None:
        return Text("enrolled key"), True
    if device.legacy:
        return Text("no key yet (adopted before enrollment): commands go unauthenticated until it enrolls "
                    "or you end that"), True
    return Text("no key: it gets no commands until it enrolls"), False


def _with_enrollment(runtime: Runtime, device: Device, enrollment: Enrollment | None) -> dict[str, Any]:
    words, commands = key_status(runtime, device)
    out = {**device.as_dict(), "key": words, "gets_commands": device.state is AdoptionState.ADOPTED and commands}
    out["enrollment"] = None if enrollment is None else {
        **enrollment.as_dict(), "replaces": device.public_key is not None or device.state is AdoptionState.ADOPTED}
    return out


def _buttons(device: Device, enrollment: Enrollment | None, _: Gettext) -> str:
    t_declared_in_config = _("declared in config")
    if device.source is DeviceSource.CONFIG:
        return f"<span class=muted>{html.escape(t_declared_in_config)}</span>"
    value = html.escape(device.id, quote=True)
    out = []

    def button(action: str, label: Text) -> None:
        out.append(f"<button name=action value='{action}:{value}'>{html.escape(say(label, _))}</button>")

    if enrollment is not None and enrollment.code is not None:
        button(f"adopt@{enrollment.code}",
               Text("Accept new key") if device.state is AdoptionState.ADOPTED else Text("Adopt"))
        button("dismiss", Text("Dismiss"))
    elif device.state is not AdoptionState.ADOPTED:
        button("adopt", Text("Adopt"))
    if device.state is AdoptionState.ADOPTED:
        button("revoke", Text("Revoke"))
        if device.legacy:
            button("end-legacy", Text("Require enrollment"))
    elif device.state is not AdoptionState.REJECTED:
        button("reject", Text("Reject"))
    return " ".join(out)


def _enrollment_note(device: Device, enrollment: Enrollment | None, _: Gettext) -> str:
    t_enrolling_no_code_yet = _("enrolling (no code yet)")
    t_adopt_only_if_the = _("(adopt only if the device shows the same code)")
    if enrollment is None:
        return ""
    esc = html.escape
    if enrollment.code is None:
        return f"<br><span class=muted>{esc(t_enrolling_no_code_yet)}</span>"
    code = f"<strong class=code>{enrollment.code[:3]}&nbsp;{enrollment.code[3:]}</strong>"
    replaces = device.public_key is not None or device.state is AdoptionState.ADOPTED
    what = (esc(_("wants to replace device {device}'s key")).format(device=esc(device.id)) if replaces
            else esc(_("enrolled")))
    return ("<br>" + esc(_("{what} from {address}: code {code}")).format(
                what=f"<strong>{what}</strong>", address=esc(enrollment.address), code=code)
            + f" <span class=muted>{esc(t_adopt_only_if_the)}</span>")


async def devices_section(runtime: Runtime, _: Gettext) -> str:
    """The homepage's Devices section: every device, its state, and adopt/reject buttons."""
    t_admin_token = _("Admin token")
    t_needed_to_adopt_reject = _("needed to adopt, reject or revoke")
    t_the_box_pushes_commands = _("The box pushes commands to adopted devices only.")
    t_no_device_yet = _("No device yet.")
    esc = html.escape
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
        address = f"{esc(d.address)}:{d.port}"
        if d.state is AdoptionState.PENDING:
            address = esc(_("came from {address}")).format(address=address)
        key_words, _pushes = key_status(runtime, d)
        kind = esc(d.kind)
        if d.kind in KIND_WORDS:
            kind = f"{esc(say(KIND_WORDS[d.kind], _))}<br><span class=muted>{kind}</span>"
        rows.append(
            f"<tr><td>{esc(d.name or d.id)}<br><span class=muted>{esc(d.id)}</span></td>"
            f"<td>{kind}</td><td>{address}</td>"
            f"<td class=state style='color:{_STATE_COLOURS[d.state]}'>{esc(say(DEVICE_STATE_WORDS[d.state], _))}</td>"
            f"<td>{esc(say(key_words, _))}{_enrollment_note(d, enrollment, _)}</td>"
            f"<td>{esc(say(ago(seen), _))}</td><td>{_buttons(d, enrollment, _)}</td></tr>"
        )
    discovery = runtime.config.discovery
    port = runtime.ports.of("discovery")
    how = esc(_("Devices appear here when they probe on udp/{port}.").format(port=port) if discovery.enabled
              else _("Discovery is off ([discovery] enabled = false): declare devices in [[devices]]."))
    title = esc(_("Devices"))
    if not rows:
        return f"<section id=devices><h2>{title}</h2><p class=muted>{esc(t_no_device_yet)} {how}</p></section>"
    head = "".join(f"<th>{esc(h)}</th>" for h in (_("device"), _("kind"), _("address"), _("state"), _("key"),
                                                  _("last seen"), ""))
    return (
        f"<section id=devices><h2>{title}</h2>"
        "<form method=post action='/devices/action' style='display:block'>"
        f"<table><tr>{head}</tr>{''.join(rows)}</table>"
        f"<p><label>{esc(t_admin_token)} <input type=password name=token autocomplete=current-password required>"
        f"</label> <span class=muted>{esc(t_needed_to_adopt_reject)}</span></p></form>"
        f"<p class=muted>{how} {esc(t_the_box_pushes_commands)}</p></section>"
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

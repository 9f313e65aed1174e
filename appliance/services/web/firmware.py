"""Firmware updates on the homepage and in /api/status: the version and slot running, an
update under way (download, window, trial), how the last one ended (docs/updates.md), and
a bundle a technician uploads, without a shell (docs/updates.md, "Without a shell"):

- ``POST /firmware/upload``: the homepage's Firmware form (plain HTML, no JavaScript):
  ``multipart/form-data`` with the admin ``token``, ``when`` (``now`` or ``window``) and
  the ``bundle`` file, in that order. The token is checked when the file's part begins,
  before any of its bytes is read: a wrong token writes nothing.
- ``POST /api/firmware?when=now|window&name=FILE`` with ``Authorization: Bearer <admin
  token>``: the bundle's bytes as the body (``application/octet-stream``), for tools
  (``curl --data-binary @appliance.raucb``).

Both stream the bundle to the data partition as it comes (``services/firmware_intake.py``:
never whole in memory, under ``[update] upload_max_bytes``, within ``[update]
upload_deadline_s``), have RAUC check its signature, and hand it to the update service. A
body too large, cut short or refused leaves nothing on disk. An answer that comes before
the client sent its whole body (a wrong token, too large) reads and drops the rest for up
to ``[http] body_timeout_s``, so a browser shows the answer rather than a reset.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any, Final

import trio
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from appliance.protocol.admin_api import BundleAccepted
from appliance.protocol.firmware import FirmwareStatus, LocalBundle, OutcomeKind, Phase, When
from appliance.protocol.multipart import MultipartError, MultipartReader, PartData, PartEnd, PartStart, boundary_of
from appliance.protocol.openapi import Operation, Param, Reply
from appliance.protocol.text import Number, Text, say
from appliance.services.firmware_intake import IntakeRefused, Sink, accept, receiving
from appliance.services.i18n import Gettext
from appliance.services.runtime import Runtime
from appliance.services.web.common import ApiError, FormError, check_form_token, require_admin
from appliance.services.web.contract import ADMIN, BodyResponse, Documented, errors
from appliance.services.web.kit import page, reader
from appliance.services.web.parts import WebParts

__all__ = ["API_PATH", "FORM_PATH", "admin_parts"]

FORM_PATH: Final = "/firmware/upload"
API_PATH: Final = "/api/firmware"
# The form's small fields (the token, "now" or "window").
FIELD_MAX_BYTES: Final = 256
BUNDLE_FIELD: Final = "bundle"

OUTCOME_WORDS = {
    OutcomeKind.COMMITTED: Text("installed and kept: the new firmware proved healthy"),
    OutcomeKind.ROLLED_BACK: Text("rolled back: the new firmware failed its trial and the box went back by itself"),
    OutcomeKind.REFUSED: Text("refused before anything was written"),
    OutcomeKind.FAILED: Text("failed; the running firmware is unchanged"),
}
PHASE_WORDS = {
    Phase.DOWNLOADING: Text("downloading"),
    Phase.WAITING: Text("downloaded and verified; waiting for the maintenance window"),
    Phase.INSTALLING: Text("installing into the other slot"),
    Phase.REBOOTING: Text("restarting into the new firmware"),
    Phase.TRIAL: Text("on trial: kept once the box is healthy, else it goes back by itself"),
    Phase.FAILED: Text("failed; tried again later"),
}


async def firmware_status(runtime: Runtime) -> dict[str, Any]:
    return {"update": runtime.firmware.report()}


async def firmware_section(runtime: Runtime, _: Gettext) -> str:
    t_firmware = _("Firmware")
    st = runtime.firmware
    version = st.version or "?"
    running = (_("{version}, slot {slot}").format(version=version, slot=st.slot) if st.slot
               else _("{version} (no A/B slots: updated by flashing an image)").format(version=version))
    rows = [(_("running version"), running)]
    if st.phase is not Phase.IDLE:
        words = say(PHASE_WORDS.get(st.phase, str(st.phase)), _)
        if st.phase is Phase.DOWNLOADING and st.offer is not None:
            words += " " + _("{version}: {done} of {size} bytes").format(
                version=st.offer.version, done=say(Number(st.done_bytes), _), size=say(Number(st.offer.size), _))
        elif st.phase is Phase.WAITING and st.window_opens_in_s is not None:
            words += " " + _("(opens in {hours} h)").format(hours=say(Number(st.window_opens_in_s / 3600, 1), _))
        elif st.trial is not None:
            words += f" ({st.trial.version})"
        rows.append((_("update"), words))
    elif st.offer is not None and st.offer.version != st.version:
        rows.append((_("offered"), st.offer.version))
    rows += _brought_rows(st, runtime.config.update.window, _)
    if st.error or st.offer_error:
        rows.append((_("problem"), say(st.error or st.offer_error, _)))
    if st.last is not None:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(st.last.at))
        what = st.last.version or _("a bundle")
        words = f"{what} {say(OUTCOME_WORDS[st.last.kind], _)} ({when})"
        if st.last.source != "platform":
            words += " " + _source_words(st.last.source, _)
        if st.last.reason:
            words = _("{where}: {error}").format(where=words, error=say(st.last.reason, _))
        rows.append((_("last update"), words))
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    form = _upload_form(runtime.config.update.window, _) if st.slot and runtime.config.update.enabled else ""
    return f"<section id=firmware><h2>{html.escape(t_firmware)}</h2><table>{body}</table>{form}</section>"


def _source_words(source: str, _: Gettext) -> str:
    return {"upload": _("(uploaded from the homepage)"), "usb": _("(from a USB stick)"),
            "boot": _("(from the boot partition)")}.get(source, "")


def _brought_rows(st: FirmwareStatus, window: str, _: Gettext) -> list[tuple[str, str]]:
    """A bundle being received, or brought and waiting for its install."""
    rows = []
    if st.receiving:
        rows.append((_("bundle"), _("{name}: being received and checked").format(name=say(st.receiving, _))))
    local = st.local
    if local is not None:
        when = _("now") if local.when is When.NOW else _("in the maintenance window ({window})").format(window=window)
        rows.append((_("bundle"), _("{version} {source}: signature checked; installs {when}").format(
            version=local.version, source=_source_words(local.source, _), when=when)))
    return rows


def _upload_form(window: str, _: Gettext) -> str:
    """Upload a bundle: the token, when, then the file (the box checks the token before it
    reads the file)."""
    esc = html.escape
    words = {
        "summary": _("Install a bundle from this computer"),
        "token": _("Admin token"),
        "window": _("in the maintenance window ({window})").format(window=window),
        "now": _("now: the box restarts into it within minutes (a few minutes without service)"),
        "file": _("Bundle (.raucb)"),
        "button": _("Upload and install"),
        "note": _("Its signature is checked before anything is written; the box keeps the new firmware only once "
                  "it proves healthy, or goes back by itself."),
    }
    w = {key: esc(value) for key, value in words.items()}
    return (
        f"<details><summary>{w['summary']}</summary>"
        f"<form method=post action='{FORM_PATH}' enctype='multipart/form-data'>"
        f"<p><label>{w['token']} <input type=password name=token autocomplete=current-password required></label></p>"
        f"<p><label><input type=radio name=when value={When.WINDOW} checked> {w['window']}</label><br>"
        f"<label><input type=radio name=when value={When.NOW}> {w['now']}</label></p>"
        f"<p><label>{w['file']} <input type=file name=bundle accept='.raucb' required></label></p>"
        f"<p><button>{w['button']}</button></p><p class=muted>{w['note']}</p>"
        "</form></details>"
    )


def admin_parts() -> WebParts:
    return WebParts(routes=(routes,), sections=(firmware_section,), status=(firmware_status,))


# --- the upload ----------------------------------------------------------------------------


class _Gone(Exception):
    """The client went away before its body was whole."""


async def _next_chunk(request: Request) -> tuple[bytes, bool]:
    """The next piece of the body and whether more follows (:class:`_Gone` when the client
    left). Read from ASGI's ``receive`` directly: nothing is buffered."""
    message = await request.receive()
    if message["type"] == "http.disconnect":
        request.state.body_done = True
        raise _Gone
    more = bool(message.get("more_body", False))
    if not more:
        request.state.body_done = True
    return message.get("body", b""), more


async def _drain(request: Request, seconds: float) -> None:
    """Read and drop what the client still sends (for at most ``seconds``), so it reads our
    answer instead of a reset on its write."""
    if getattr(request.state, "body_done", False):
        return
    with trio.move_on_after(seconds):
        try:
            while (await _next_chunk(request))[1]:
                pass
        except _Gone:
            pass


def _declared(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 15:
        raise IntakeRefused(400, Text("The request's Content-Length is not a number."))
    return int(raw)


def _when(raw: str) -> When:
    try:
        return When(raw)
    except ValueError:
        raise IntakeRefused(400, Text("'when' is 'now' or 'window', not {value}.", value=repr(raw[:20]))) from None


async def _receive_form(request: Request, runtime: Runtime, stack: AsyncExitStack) -> tuple[Sink, str, When]:
    """The form's fields and its file, streamed into a sink (:class:`FormError` or
    :class:`IntakeRefused` when it cannot be)."""
    try:
        reader = MultipartReader(boundary_of(request.headers.get("content-type", "")))
    except MultipartError as exc:
        raise FormError(415, Text("The upload could not be read: {error}.", error=str(exc))) from exc
    declared = _declared(request)
    fields: dict[str, str] = {}
    part: PartStart | None = None
    value = bytearray()
    sink: Sink | None = None
    filename = ""
    more = True
    while more:
        chunk, more = await _next_chunk(request)
        reader.receive_data(chunk)
        if not more:
            reader.receive_data(b"")
        while True:
            event = reader.next_event()
            if isinstance(event, PartStart):
                part, value = event, bytearray()
                if event.name == BUNDLE_FIELD and event.filename is not None:
                    check_form_token(fields, runtime, consequence=Text("nothing was uploaded"))
                    if sink is not None:
                        raise FormError(400, Text("The form carries two bundle files; send one."))
                    filename = event.filename
                    if not filename:
                        raise FormError(400, Text("Choose a bundle file (.raucb) first; nothing was uploaded."))
                    sink = await stack.enter_async_context(receiving(runtime, name=filename, declared=declared))
            elif isinstance(event, PartData) and part is not None:
                if sink is not None and part.name == BUNDLE_FIELD:
                    await sink.write(event.data)
                else:
                    value += event.data
                    if len(value) > FIELD_MAX_BYTES:
                        raise FormError(400, Text("The form field {field} is too long.", field=repr(part.name)))
            elif isinstance(event, PartEnd) and part is not None:
                if part.name != BUNDLE_FIELD:
                    try:
                        fields[part.name] = value.decode("utf-8")
                    except UnicodeDecodeError:
                        raise FormError(400, Text("The form field {field} is not UTF-8.",
                                                  field=repr(part.name))) from None
                part = None
            else:
                break  # NEED_DATA, or Done (the epilogue, if any, is dropped)
    if sink is None:
        check_form_token(fields, runtime, consequence=Text("nothing was uploaded"))
        raise FormError(400, Text("The form carried no bundle file; nothing was uploaded."))
    return sink, filename, _when(fields.get("when", When.WINDOW))


def _answer(request: Request, heading: Text, lines: Sequence[str], status: int) -> HTMLResponse:
    """The upload form's answer, in the language of the browser that sent it."""
    language, _ = reader(request)
    back = _("Back to the homepage")
    items = "".join(f"<li>{html.escape(say(line, _))}</li>" for line in lines)
    body = page(_("Store appliance"), _("firmware"),
                [f"<section><h2>{html.escape(say(heading, _))}</h2><ul>{items}</ul>"
                 f"<p><a href='/#firmware'>{html.escape(back)}</a></p></section>"], lang=language)
    return HTMLResponse(body, status_code=status, headers={"Content-Language": language, "Vary": "Accept-Language"})


def _accepted_lines(local: LocalBundle, window: str) -> list[Text]:
    lines = [Text("{name}: firmware {version}, {size} bytes; its signature checks against this box's keyring.",
                  name=local.name, version=local.version, size=Number(local.size))]
    if local.when is When.NOW:
        lines.append(Text("It is being installed into the other system slot now; then the box restarts into it "
                          "(a few minutes without service) and keeps it only once it proves healthy."))
    else:
        lines.append(Text("It will be installed in the maintenance window ({window}); the box then restarts into it "
                          "and keeps it only once it proves healthy.", window=window))
    lines.append(Text("The homepage's Firmware section shows how it goes."))
    return lines


def routes(runtime: Runtime) -> Sequence[BaseRoute]:
    deadline_s = runtime.config.update.upload_deadline_s

    async def form(request: Request) -> Response:
        try:
            async with AsyncExitStack() as stack:
                with trio.move_on_after(deadline_s) as scope:
                    sink, name, when = await _receive_form(request, runtime, stack)
                if scope.cancelled_caught:
                    raise IntakeRefused(408, Text("The upload did not arrive whole within {seconds} s ([update] "
                                                  "upload_deadline_s); nothing was kept.",
                                                  seconds=Number(deadline_s, 1)))
                local = await accept(runtime, sink, name=name, source="upload", when=when)
        except (FormError, IntakeRefused) as exc:
            await _drain(request, runtime.config.http.body_timeout_s)
            return _answer(request, Text("Nothing was installed"), [exc.message], exc.status)
        except MultipartError as exc:
            await _drain(request, runtime.config.http.body_timeout_s)
            return _answer(request, Text("Nothing was installed"),
                           [Text("The upload could not be read: {error}; nothing was kept.", error=str(exc))], 400)
        except _Gone:
            return _answer(request, Text("Nothing was installed"),
                           [Text("The upload was cut short; nothing was kept.")], 400)
        return _answer(request, Text("Bundle accepted"), _accepted_lines(local, runtime.config.update.window), 202)

    async def api(request: Request) -> Response:
        try:
            require_admin(request, runtime)
        except ApiError:
            await _drain(request, runtime.config.http.body_timeout_s)
            raise
        ctype = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        try:
            if ctype != "application/octet-stream":
                raise IntakeRefused(415, Text("Send the bundle's bytes as application/octet-stream, not {what}.",
                                              what=ctype or Text("nothing")))
            when = _when(request.query_params.get("when", When.WINDOW))
            name = request.query_params.get("name", "bundle.raucb")
            async with receiving(runtime, name=name, declared=_declared(request)) as sink:
                with trio.move_on_after(deadline_s) as scope:
                    more = True
                    while more:
                        chunk, more = await _next_chunk(request)
                        await sink.write(chunk)
                if scope.cancelled_caught:
                    raise IntakeRefused(408, Text("The bundle did not arrive whole within {seconds} s; nothing was "
                                                  "kept.", seconds=Number(deadline_s, 1)))
                local = await accept(runtime, sink, name=name, source="upload", when=when)
        except IntakeRefused as exc:
            await _drain(request, runtime.config.http.body_timeout_s)
            raise ApiError(exc.status, exc.message) from exc
        except _Gone:
            raise ApiError(400, "the body was cut short; nothing was kept") from None
        body = BundleAccepted(version=local.version, sha256=local.sha256, size=local.size, name=local.name,
                              when="now" if local.when is When.NOW else "window", update=runtime.firmware.report())
        return BodyResponse(body, status_code=202)

    return [Route(FORM_PATH, form, methods=["POST"]), Documented(API_PATH, api, method="POST", operation=_UPLOAD)]


_UPLOAD: Final = Operation(
    summary="Upload a firmware bundle: its signature is checked, then it is installed now or in the maintenance window",
    description="The body is the bundle file itself (at most `[update] upload_max_bytes`), streamed to the data "
                "partition; RAUC checks its signature against the box's keyring before anything is written to a "
                "system slot. The install, the restart and the trial then go as for an update from the platform "
                "(`/api/status` `update`; docs/updates.md).",
    tag="firmware", raw_body="application/octet-stream",
    params=(Param(name="when", where="query", description="`now`: install at once; `window`: in the maintenance "
                                                          "window (the default)",
                  schema={"type": "string", "enum": ["now", "window"], "default": "window"}),
            Param(name="name", where="query", description="the file's name, as the homepage shows it",
                  schema={"type": "string", "maxLength": 128})),
    replies=(Reply(status=202, description="taken: the signature checks; the install follows", body=BundleAccepted),
             *errors(400, 401, 408, 409, 413, 415, 503, 507,
                     e400="refused: not a bundle signed for this box (nothing was written), empty, or cut short",
                     e409="an update is under way, the version runs already, or the box has no A/B slots")),
    security=(ADMIN,))

"""Device commands over HTTP: enqueue and inspect (store API, port 8000), and the homepage's
device links section with a "send test command" button (admin, port 80).

Store API; enqueueing takes ``Authorization: Bearer <admin token>``, reading also takes
the signature of the device in the path (a device reads its own commands only):

- ``POST /v1/devices/{device_id}/commands`` ``{"kind", "body", "expires_at"?, "id"?}`` ->
  201 ``{"id", "device_id", "seq", "state"}`` once the command is durable. ``id`` is an
  optional client-made command id: sending the same id again returns the stored command
  (200, ``"created": false``) instead of adding a second one, so a client may retry a
  request whose answer it never got. Unknown device: 404; not adopted: 409; a bad body:
  400 with one path-named line per problem.
- ``POST /v1/commands`` ``{"commands": [{"device_id", "kind", "body", "expires_at"?, "id"?}, ...]}``
  (at most :data:`MAX_BATCH`) -> 201 ``{"commands": [{"id", "device_id", "seq", "created"}, ...]}``
  in the request's order, all in one transaction (one durable commit for the lot): all
  accepted or none. Errors as above, each path-named (``commands[3].kind``).
- ``GET /v1/devices/{device_id}/commands?state=queued|sent|acked|dead&limit=N``: newest first.
- ``GET /v1/devices/{device_id}/commands/{command_id}``.

The homepage form posts ``POST /devices/test-command`` with the admin token in a
password field (an HTML form cannot send a header; same reasoning as the device
registry's forms in ``web/devices.py``) and the device id on the button.
"""

from __future__ import annotations

import html
import math
import time
import urllib.parse
from collections.abc import Sequence
from functools import partial
from typing import Any, Final, cast

import msgspec
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from appliance.protocol.channel_codec import (
    MAX_BODY_BYTES,
    ChannelProtocolError,
    check_command_id,
    check_kind,
    encode_body,
)
from appliance.protocol.openapi import Operation, Param, Reply
from appliance.protocol.store_api import (
    BATCH_MAX,
    BatchAnswer,
    CommandAnswer,
    CommandBatch,
    CommandList,
    CommandRequest,
    CommandView,
)
from appliance.protocol.text import Number, Text, say
from appliance.services.device_link import DeviceLinkPhase
from appliance.services.dispatcher import enqueue, enqueue_many
from appliance.services.i18n import Gettext
from appliance.services.runtime import Runtime
from appliance.services.web.common import (
    ApiError,
    FormError,
    answer_in_front,
    check_form_token,
    from_browser,
    read_form,
    read_json,
    require_admin,
    whole_number,
)
from appliance.services.web.contract import ADMIN, DEVICE, BodyResponse, Documented, errors, path_param
from appliance.services.web.device_auth import authenticate
from appliance.services.web.kit import AMBER, GREEN, GREY, LINK_PHASE_WORDS, RED, ago, not_done
from appliance.services.web.parts import WebParts
from appliance.storage.devices import AdoptionState, get_device
from appliance.storage.outbox import (
    MAX_LIST,
    CommandIdTaken,
    CommandState,
    OutboxError,
    get_command,
    list_commands,
)

__all__ = ["MAX_BATCH", "admin_parts", "api_parts", "parse_command_request"]

_KEYS: Final = ("kind", "body", "expires_at", "id")
# The homepage's test command: a ping that is useless after ten minutes.
TEST_KIND: Final = "ping"
TEST_TTL_S: Final = 600.0
# The most commands one POST /v1/commands takes: a 40-line order to a few screens with room
# to spare, and one transaction of a few ms (storage.db.GROUP_MAX is of the same order).
MAX_BATCH: Final = BATCH_MAX


def parse_command_request(data: Any, now: float) -> tuple[str, dict[str, Any], float | None, str | None, str]:
    """``(kind, body, expires_at, id, body_text)`` from a request body (``body_text``: the
    body as the outbox stores it), or ApiError(400) naming every problem by its path."""
    errors: list[str] = []
    parsed = _parse_command(data, now, errors, at="", keys=_KEYS)
    if parsed is None:
        raise ApiError(400, "the command is not valid", errors)
    return parsed


def parse_batch_request(data: Any, now: float) -> list[tuple[str, str, dict[str, Any], float | None, str | None]]:
    """``[(device_id, kind, body, expires_at, id), ...]`` from a POST /v1/commands body, or
    ApiError(400) naming every problem by its path."""
    if not isinstance(data, dict) or set(data) != {"commands"} or not isinstance(data["commands"], list):
        raise ApiError(400, "the batch is not valid", ['(top level): must be {"commands": [...]}, one key'])
    items: list[Any] = data["commands"]
    if not 1 <= len(items) <= MAX_BATCH:
        raise ApiError(400, "the batch is not valid", [f"commands: from 1 to {MAX_BATCH} commands, got {len(items)}"])
    errors: list[str] = []
    out = []
    for n, item in enumerate(items):
        at = f"commands[{n}]"
        device_id = item.get("device_id") if isinstance(item, dict) else None
        if isinstance(item, dict) and not (isinstance(device_id, str) and device_id):
            errors.append(f"{at}.device_id: required, a device id")
        parsed = _parse_command(item, now, errors, at=at, keys=("device_id", *_KEYS))
        if parsed is not None and isinstance(device_id, str) and device_id:
            out.append((device_id, *parsed[:4]))
    if errors:
        raise ApiError(400, "the batch is not valid", errors)
    return out


def _parse_command(data: Any, now: float, errors: list[str], *, at: str,
                   keys: Sequence[str]) -> tuple[str, dict[str, Any], float | None, str | None, str] | None:
    """One command's fields and its body as encoded for the outbox, or None with its
    problems added to ``errors`` (paths under ``at``)."""
    where = f"{at}." if at else ""
    if not isinstance(data, dict):
        errors.append(f"{at or '(top level)'}: must be a JSON object, got {type(data).__name__}")
        return None
    before = len(errors)
    extra = sorted(set(data) - set(keys))
    if extra:
        errors.append(f"{at or '(top level)'}: unknown key(s) {', '.join(extra)}; a command has {', '.join(keys)}")
    kind = data.get("kind")
    body = data.get("body")
    expires_at = data.get("expires_at")
    command_id = data.get("id")
    body_text = ""
    if kind is None:
        errors.append(f"{where}kind: required (e.g. \"order.created\", \"print\", \"display\", \"ping\")")
    else:
        try:
            check_kind(kind)
        except ChannelProtocolError as exc:
            errors.append(f"{where}kind: {exc}")
    if body is None:
        errors.append(f"{where}body: required (a JSON object, {{}} for none)")
    elif not isinstance(body, dict):
        errors.append(f"{where}body: must be a JSON object, got {type(body).__name__}")
    else:
        try:
            body_text = encode_body(body)
        except ChannelProtocolError as exc:
            errors.append(f"{where}body: {exc}")
    if expires_at is not None:
        if isinstance(expires_at, bool) or not isinstance(expires_at, int | float) or not math.isfinite(expires_at):
            errors.append(f"{where}expires_at: must be a number of Unix seconds or null, got "
                          f"{type(expires_at).__name__}")
        elif expires_at <= now:
            errors.append(f"{where}expires_at: {expires_at:.3f} is already past (the box's clock says {now:.3f})")
    if command_id is not None:
        try:
            check_command_id(command_id)
        except ChannelProtocolError as exc:
            errors.append(f"{where}id: {exc}")
    if len(errors) > before:
        return None
    # Every value was checked above; the casts only tell the type checker so.
    return (cast(str, kind), cast(dict[str, Any], body), None if expires_at is None else float(expires_at),
            cast(str | None, command_id), body_text)


async def _adopted_or_raise(runtime: Runtime, device_id: str, *, must_be_adopted: bool) -> None:
    # An adopted device's state is taken from the key ring (runtime.keys: every change of a
    # device's state or key makes it forget what it cached); otherwise one row by its
    # primary key, read in trio's thread (Database.read_small), and remembered. The read was
    # a third of the command route's own time under one client posting back to back.
    trusted = runtime.keys.cached(device_id)
    if trusted is not None and trusted.state is AdoptionState.ADOPTED:
        return
    generation = runtime.keys.generation
    device = await runtime.db.read_small(partial(get_device, device_id=device_id))
    if device is None:
        raise ApiError(404, f"no device {device_id!r} in the registry")
    if runtime.keys.generation == generation:  # nothing was forgotten while it was read
        runtime.keys.remember(device)
    if must_be_adopted and device.state is not AdoptionState.ADOPTED:
        raise ApiError(409, f"device {device_id!r} is {device.state}: adopt it first (the box pushes commands to "
                            "adopted devices only)")


async def _post_command(runtime: Runtime, request: Request) -> Response:
    """``POST /v1/devices/{device_id}/commands``: one command, durable before the answer."""
    require_admin(request, runtime)
    device_id = request.path_params["device_id"]
    # The command's body is bounded by the channel (MAX_BODY_BYTES); twice that leaves
    # room for the request's own fields and the client's whitespace.
    data = await read_json(request, min(runtime.config.http.max_body_bytes, 2 * MAX_BODY_BYTES))
    kind, body, expires_at, command_id, body_text = parse_command_request(data, time.time())
    await _adopted_or_raise(runtime, device_id, must_be_adopted=True)
    try:
        done = await enqueue(runtime, device_id, kind, body, expires_at, command_id=command_id, body_text=body_text)
    except CommandIdTaken as exc:
        raise ApiError(409, str(exc)) from exc
    except OutboxError as exc:
        raise ApiError(400, "the command is not valid", [str(exc)]) from exc
    # A new command was queued by the commit just made; only a repeated id needs its
    # stored state read back (one row by its key, in trio's thread).
    row = None if done.created else await runtime.db.read_small(partial(get_command, command_id=done.id))
    answer = {"id": done.id, "device_id": device_id, "seq": done.seq,
              "state": str(row.state) if row is not None else "queued", "created": done.created}
    location = f"/v1/devices/{urllib.parse.quote(device_id)}/commands/{done.id}"
    return BodyResponse(msgspec.convert(answer, CommandAnswer), status_code=201 if done.created else 200,
                        headers={"Location": location})


class CommandPosts:
    """A front handler of the store API (:class:`WebParts` ``front``): ``POST
    /v1/devices/{device_id}/commands`` is answered by the route's own function here, before
    Starlette's error and CORS middleware and its router (docs/store-api.md, "Speed"); a
    browser's request (``Origin``) takes the app's way."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> bool:
        path: str = scope["path"] if scope["type"] == "http" and scope["method"] == "POST" else ""
        if not (path.startswith(_DEVICES) and path.endswith(_COMMANDS)) or from_browser(scope):
            return False
        device_id = path[len(_DEVICES):-len(_COMMANDS)]
        if not device_id or "/" in device_id:  # as the route's {device_id} matches
            return False
        scope["path_params"] = {"device_id": device_id}
        await answer_in_front(scope, receive, send, partial(_post_command, self.runtime))
        return True


_DEVICES: Final = "/v1/devices/"
_COMMANDS: Final = "/commands"


def api_routes(runtime: Runtime) -> Sequence[BaseRoute]:
    async def post(request: Request) -> Response:
        return await _post_command(runtime, request)

    async def post_batch(request: Request) -> Response:
        require_admin(request, runtime)
        data = await read_json(request, runtime.config.http.max_body_bytes)
        commands = parse_batch_request(data, time.time())
        for device_id in dict.fromkeys(c[0] for c in commands):
            await _adopted_or_raise(runtime, device_id, must_be_adopted=True)
        try:
            done = await enqueue_many(runtime, commands)
        except CommandIdTaken as exc:
            raise ApiError(409, f"{exc}; no command of the batch was queued") from exc
        except OutboxError as exc:
            raise ApiError(400, "the batch is not valid", [f"{exc}; no command of the batch was queued"]) from exc
        answer = [{"id": d.id, "device_id": d.device_id, "seq": d.seq, "created": d.created} for d in done]
        return BodyResponse(msgspec.convert({"commands": answer}, BatchAnswer),
                            status_code=201 if any(d.created for d in done) else 200)

    async def listing(request: Request) -> Response:
        caller = await authenticate(request, runtime)
        device_id = request.path_params["device_id"]
        caller.require(device_id, "the device in the path")
        errors = []
        state_text = request.query_params.get("state")
        state: CommandState | None = None
        if state_text is not None:
            try:
                state = CommandState(state_text)
            except ValueError:
                errors.append(f"state: one of {', '.join(s.value for s in CommandState)}, got {state_text!r}")
        limit_text = request.query_params.get("limit", "100")
        limit = whole_number(limit_text, 1, MAX_LIST)
        if limit is None:
            errors.append(f"limit: a whole number from 1 to {MAX_LIST}, got {limit_text!r:.40}")
        if errors:
            raise ApiError(400, "bad query", errors)
        await _adopted_or_raise(runtime, device_id, must_be_adopted=False)
        rows = await runtime.db.read(partial(list_commands, device_id=device_id, state=state,
                                                          limit=limit or MAX_LIST))  # not None: checked above
        return BodyResponse(msgspec.convert({"device_id": device_id, "commands": [r.as_dict() for r in rows]},
                                            CommandList))

    async def one(request: Request) -> Response:
        caller = await authenticate(request, runtime)
        device_id, command_id = request.path_params["device_id"], request.path_params["command_id"]
        caller.require(device_id, "the device in the path")
        row = await runtime.db.read(partial(get_command, command_id=command_id))
        if row is None or row.device_id != device_id:
            raise ApiError(404, f"no command {command_id!r} for device {device_id!r}")
        return BodyResponse(msgspec.convert({"command": row.as_dict()}, CommandView))

    return [
        Documented("/v1/devices/{device_id}/commands", post, method="POST", operation=_POST),
        Documented("/v1/commands", post_batch, method="POST", operation=_BATCH),
        Documented("/v1/devices/{device_id}/commands", listing, method="GET", operation=_LIST),
        Documented("/v1/devices/{device_id}/commands/{command_id}", one, method="GET", operation=_ONE),
    ]


_DEVICE: Final = path_param("device_id", "the device's id in the registry")
_POST: Final = Operation(
    summary="Queue a command for an adopted device (durable before the answer)", tag="commands",
    body=CommandRequest, params=(_DEVICE,),
    description="The box pushes it over the device channel (docs/device-channel.md) until the device acks it or "
                "it expires. Sending the same `id` again answers the stored command (200) instead of adding one.",
    replies=(Reply(status=201, description="queued", body=CommandAnswer),
             Reply(status=200, description="a command with this id was queued before", body=CommandAnswer),
             *errors(400, 401, 404, 408, 409, 413, e404="no such device in the registry",
                     e409="the device is not adopted, or the id names another device's command")),
    security=(ADMIN,))
_BATCH: Final = Operation(
    summary="Queue many commands, for one device or several, in one transaction (all or none)", tag="commands",
    body=CommandBatch,
    description="One durable commit for the lot: an online order's fan-out, a menu update. The answer lists "
                f"the commands in the request's order. At most {MAX_BATCH} commands.",
    replies=(Reply(status=201, description="queued (some or all new)", body=BatchAnswer),
             Reply(status=200, description="every command's id was queued before", body=BatchAnswer),
             *errors(400, 401, 404, 408, 409, 413, e404="a device is not in the registry",
                     e409="a device is not adopted, or an id names another command")),
    security=(ADMIN,))
_LIST: Final = Operation(
    summary="A device's commands, newest first", tag="commands",
    params=(_DEVICE,
            Param(name="state", where="query", description="only commands in this state",
                  schema={"type": "string", "enum": [s.value for s in CommandState]}),
            Param(name="limit", where="query", description="at most this many",
                  schema={"type": "integer", "minimum": 1, "maximum": MAX_LIST, "default": 100})),
    replies=(Reply(status=200, description="the commands", body=CommandList),
             *errors(400, 401, 403, 404, 429, e404="no such device in the registry")),
    security=(DEVICE, ADMIN))
_ONE: Final = Operation(
    summary="One command of a device", tag="commands",
    params=(_DEVICE, path_param("command_id", "the command's id")),
    replies=(Reply(status=200, description="the command", body=CommandView),
             *errors(401, 403, 404, 429, e404="no such command for this device")),
    security=(DEVICE, ADMIN))


# --- the homepage ------------------------------------------------------------------




def admin_routes(runtime: Runtime) -> Sequence[BaseRoute]:
    async def test_command(request: Request) -> Response:
        try:
            form = await read_form(request)
            check_form_token(form, runtime, consequence=Text("nothing was sent"))
            device_id = form.get("device", "")
            try:
                await _adopted_or_raise(runtime, device_id, must_be_adopted=True)
            except ApiError as exc:
                raise FormError(exc.status, Text("{reason}; nothing was sent.", reason=exc.message)) from exc
            now = time.time()
            await enqueue(runtime, device_id, TEST_KIND,
                          {"text": "test command from the store appliance's homepage", "sent_at": now},
                          now + TEST_TTL_S)
        except FormError as exc:
            return not_done(request, exc.status, exc.message, subtitle=Text("device links"), anchor="device-links",
                            heading=Text("Not sent"))
        return RedirectResponse("/#device-links", status_code=303)

    return [Route("/devices/test-command", test_command, methods=["POST"])]


_PHASE_COLOURS: Final = {DeviceLinkPhase.CONNECTED: GREEN, DeviceLinkPhase.CONNECTING: AMBER,
                         DeviceLinkPhase.BACKING_OFF: RED, DeviceLinkPhase.STOPPED: GREY}


async def links_section(runtime: Runtime, _: Gettext) -> str:
    """The homepage's Device links section: one row per adopted device's link."""
    t_admin_token = _("Admin token")
    t_needed_to_send_a = _("needed to send a test command ({kind})")
    t_no_adopted_device_the = _("No adopted device: the box pushes commands to adopted devices only.")
    t_send_test_command = _("Send test command")
    esc = html.escape
    board = runtime.device_links
    port = runtime.config.lan.ports.device
    title = esc(_("Device links (tcp/{port})").format(port=port))
    if not board.links:
        return (f"<section id=device-links><h2>{title}</h2><p class=muted>"
                f"{esc(t_no_adopted_device_the)}</p></section>")
    now = time.time()
    rows = []
    for s in board.all():
        t = s.target
        waiting = board.backlog.get(t.id)
        connected = s.phase is DeviceLinkPhase.CONNECTED
        note = say(s.last_error, _) if not connected else (
            _("firmware {version}").format(version=s.firmware) if s.firmware else "")
        fix = f"<br><span class=muted>{esc(say(s.last_fix, _))}</span>" if note and s.last_fix and not connected else ""
        value = esc(t.id, quote=True)
        rows.append(
            f"<tr><td>{esc(t.name)}<br><span class=muted>{esc(t.id)}</span></td>"
            f"<td>{esc(t.address)}:{t.port}</td>"
            f"<td class=state style='color:{_PHASE_COLOURS[s.phase]}'>{esc(say(LINK_PHASE_WORDS[s.phase], _))}</td>"
            f"<td>{esc(say(ago(None if s.last_ack_at is None else now - s.last_ack_at), _))}</td>"
            f"<td>{say(Number(waiting.depth if waiting else 0), _)}</td>"
            f"<td>{esc(note)}{fix}</td>"
            f"<td><button name=device value='{value}'>{esc(t_send_test_command)}</button></td></tr>"
        )
    head = "".join(f"<th>{esc(h)}</th>" for h in (_("device"), _("address"), _("link"), _("last ack"),
                                                  _("waiting"), _("note"), ""))
    return (
        f"<section id=device-links><h2>{title}</h2>"
        "<form method=post action='/devices/test-command' style='display:block'>"
        f"<table><tr>{head}</tr>{''.join(rows)}</table>"
        f"<p><label>{esc(t_admin_token)} <input type=password name=token autocomplete=current-password required>"
        f"</label> <span class=muted>{esc(t_needed_to_send_a.format(kind=TEST_KIND))}"
        "</span></p></form></section>"
    )


async def links_status(runtime: Runtime) -> dict[str, Any]:
    """The ``device_links`` and ``outbox`` keys of /api/status."""
    board = runtime.device_links
    return {"device_links": [s.as_dict() for s in board.all()],
            "outbox": {"depth": sum(b.depth for b in board.backlog.values()),
                       "devices": {d: b.depth for d, b in sorted(board.backlog.items())}}}


def api_parts() -> WebParts:
    return WebParts(routes=(api_routes,), front=(CommandPosts,))


def admin_parts() -> WebParts:
    return WebParts(routes=(admin_routes,), sections=(links_section,), status=(links_status,))

"""The support listener (port 8005): the diagnostics bundle and the live log tail.

Both need the admin token: ``Authorization: Bearer <token>`` for tools (``curl``), or a
form field ``token`` in a ``POST`` from the homepage (a browser form cannot send the
header).

- ``GET /v1/bundle?logs=N`` (or ``POST`` from the form): a ``.tar.gz`` (docs/support.md
  lists its parts), with the last N log records (default 5000).
- ``GET /v1/logs/tail?level=&logger=&backlog=N``: Server-Sent Events, one ``log`` event per
  record (``id`` is its seq, ``data`` the record as JSON), first the last N records in
  memory that match (default 100), then new ones as they are logged (within
  :data:`POLL_S`). ``level``: the least level shown; ``logger``: a name prefix. A ``gap``
  event says how many records passed too fast to be shown. The form's ``POST`` streams
  the same records as plain text lines, which a browser shows as they come.

At most :data:`MAX_TAILS` tails at once; each ends when the box stops.
"""

from __future__ import annotations

import html
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Final

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from appliance.protocol.text import Text
from appliance.services.bundle import DEFAULT_LOG_RECORDS, MAX_LOG_RECORDS, bundle_of
from appliance.services.i18n import Gettext
from appliance.services.log_ring import current_redactor
from appliance.services.runtime import Runtime
from appliance.services.web.common import (
    ApiError,
    FormError,
    check_form_token,
    read_form,
    require_admin,
    service_app,
)
from appliance.services.web.parts import WebParts

__all__ = ["admin_parts", "create_app"]

log = logging.getLogger(__name__)

# How often a tail looks for new records: the "within 1 s" of docs/support.md, with room.
POLL_S: Final = 0.2
KEEPALIVE_S: Final = 15.0
MAX_TAILS: Final = 4
DEFAULT_BACKLOG: Final = 100
MAX_BACKLOG: Final = 2000
CHUNK: Final = 64 * 1024
_LEVELS: Final = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


def _int_param(request: Request, name: str, default: int, maximum: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or int(raw) > maximum:
        raise ApiError(400, f"{name}: a whole number from 0 to {maximum}, got {raw!r}")
    return int(raw)


async def _authorised(request: Request, runtime: Runtime) -> bool:
    """True for a form (POST, token field), False for a tool (GET, bearer header)."""
    if request.method == "POST":
        try:
            check_form_token(await read_form(request), runtime, consequence=Text("nothing was sent"))
        except FormError as exc:
            raise ApiError(exc.status, exc.message) from exc
        return True
    require_admin(request, runtime)
    return False


class _Tails:
    def __init__(self) -> None:
        self.open = 0


def create_app(runtime: Runtime, parts: WebParts) -> Starlette:
    tails = _Tails()

    async def bundle(request: Request) -> Response:
        await _authorised(request, runtime)
        records = _int_param(request, "logs", DEFAULT_LOG_RECORDS, MAX_LOG_RECORDS)
        data, manifest = await bundle_of(runtime, log_records=records)
        failed = [name for name, part in manifest["parts"].items() if part["status"] != "ok"]
        log.info("diagnostics bundle taken on the LAN: %d bytes%s", len(data),
                 f", parts not readable: {', '.join(failed)}" if failed else "")
        name = f"appliance-bundle-{runtime.appliance_id}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.tar.gz"

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(data), CHUNK):
                yield data[start:start + CHUNK]

        return StreamingResponse(chunks(), media_type="application/gzip", headers={
            "Content-Disposition": f'attachment; filename="{name}"', "Content-Length": str(len(data)),
            "Cache-Control": "no-store"})

    async def tail(request: Request) -> Response:
        as_text = await _authorised(request, runtime)
        level = request.query_params.get("level", "debug").lower()
        if level not in _LEVELS:
            raise ApiError(400, f"level: one of {', '.join(_LEVELS)}, got {level!r}")
        prefix = request.query_params.get("logger", "")
        backlog = _int_param(request, "backlog", DEFAULT_BACKLOG, MAX_BACKLOG)
        ring = runtime.log_ring
        if ring is None:
            raise ApiError(503, "the log ring is not open; see the logs.ring service on the homepage")
        if tails.open >= MAX_TAILS:
            raise ApiError(503, f"{MAX_TAILS} log tails are open already; close one")
        least = _LEVELS[level]

        def wanted(item: dict[str, Any]) -> bool:
            return _LEVELS.get(str(item.get("level")), 0) >= least and str(item.get("logger", "")).startswith(prefix)

        def render(item: dict[str, Any]) -> str:
            redactor = current_redactor(runtime)
            if as_text:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(item.get("ts", 0))))
                line = f"{stamp} {str(item.get('level')).upper()} {item.get('logger')}: {item.get('msg')}"
                return redactor.redact(line.replace("\n", "\\n")) + "\n"
            data = redactor.redact(json.dumps(item, ensure_ascii=False, separators=(",", ":"), default=str))
            return f"id: {item['seq']}\nevent: log\ndata: {data}\n\n"

        async def events() -> AsyncIterator[str]:
            tails.open += 1
            try:
                recent = ring.recent_after(0)
                last = recent[-1]["seq"] if recent else ring.last_seq
                yield ": the appliance's log, live\n\n" if not as_text else "# the appliance's log, live\n"
                for item in [i for i in recent if wanted(i)][-backlog:] if backlog else []:
                    yield render(item)
                quiet_since = trio.current_time()
                while not runtime.stopping.is_set():
                    await trio.sleep(POLL_S)
                    fresh = ring.recent_after(last)
                    if not fresh:
                        if trio.current_time() - quiet_since >= KEEPALIVE_S and not as_text:
                            quiet_since = trio.current_time()
                            yield ": keep-alive\n\n"
                        continue
                    if fresh[0]["seq"] > last + 1 and not as_text:
                        yield f"event: gap\ndata: {json.dumps({'missed': fresh[0]['seq'] - last - 1})}\n\n"
                    last = fresh[-1]["seq"]
                    quiet_since = trio.current_time()
                    for item in fresh:
                        if wanted(item):
                            yield render(item)
            finally:
                tails.open -= 1

        media = "text/plain; charset=utf-8" if as_text else "text/event-stream"
        return StreamingResponse(events(), media_type=media, headers={
            "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})

    routes: list[BaseRoute] = [
        Route("/v1/bundle", bundle, methods=["GET", "POST"]),
        Route("/v1/logs/tail", tail, methods=["GET", "POST"]),
    ]
    return service_app("support", runtime, [*routes, *parts.routes_for(runtime)])


# --- the homepage's part ------------------------------------------------------------------------------


def _admin_routes(runtime: Runtime) -> list[BaseRoute]:
    async def to_support(request: Request) -> Response:
        """The homepage's forms post here; 307 keeps the method and the form (the token)
        and sends them to the same host on the support port."""
        what = request.path_params["what"]
        host = request.url.hostname or "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        target = {"bundle": "/v1/bundle", "tail": "/v1/logs/tail"}[what]
        query = f"?{request.url.query}" if request.url.query else ""
        return RedirectResponse(f"http://{host}:{runtime.ports['support']}{target}{query}", status_code=307)

    return [Route("/support/{what:str}", to_support, methods=["POST"])]


async def _section(runtime: Runtime, _: Gettext) -> str:
    t_support = _("Support")
    t_download_the_diagnostics_bundle = _("Download the diagnostics bundle")
    t_watch_the_live_log = _("Watch the live log")
    t_admin_token = _("admin token")
    esc = html.escape

    def form(what: str, label: str, query: str = "") -> str:
        return (f"<form method=post action='/support/{what}{query}'>"
                f"<input type=password name=token placeholder='{esc(t_admin_token)}' "
                f"aria-label='{esc(t_admin_token)}' autocomplete=off required> <button>{esc(label)}</button></form>")

    intro = _("For a technician: everything support asks for, in one file, and the log as it is written "
              "(port {port}).").format(port=runtime.ports.get("support", 8005))
    return (f"<section><h2>{esc(t_support)}</h2><p>{esc(intro)}</p>"
            f"<p>{form('bundle', t_download_the_diagnostics_bundle)}</p>"
            f"<p>{form('tail', t_watch_the_live_log, '?level=info')}</p></section>")


def admin_parts() -> WebParts:
    """The homepage's support links: two small forms and the redirect they post to."""
    return WebParts(routes=(_admin_routes,), sections=(_section,))

"""Pairing and cloud sync on the admin listener (port 80): a homepage section, a form, JSON.

- Homepage "Cloud" section: unpaired / paired / "pair again", the pairing form, and the
  sync state (cursor, lag, snapshot progress, events waiting, the failing hop and its fix,
  the platform's latest rejections).
- ``POST /pairing``: the form. No JavaScript, so no Authorization header: like the
  device adoption form (``services/web/devices.py``), it carries the admin token as a
  password field; no session, no cookie, nothing a cross-site form could forge.
- ``POST /api/pairing`` ``{"code": ...}`` with ``Authorization: Bearer <admin token>``.
- Both take a code with no admin token while the box has never been paired: the code from
  the back office is the proof of authority, and the pairing answer brings the owner's
  admin credential (``services/pairing.py``, docs/retailer.md).
- ``/api/status`` gets a ``cloud`` key (see ``services/sync_health.py``).
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from appliance.protocol.admin_api import PairingAnswer, PairingRequest
from appliance.protocol.openapi import Operation, Reply
from appliance.protocol.store_api import Error
from appliance.services.i18n import Gettext
from appliance.services.pairing import PairingFailed, describe, is_claimed, pair_from_web
from appliance.services.runtime import Runtime
from appliance.services.sync_health import cloud_status
from appliance.services.web.common import ApiError, FormError, check_form_token, read_form, read_json, require_admin
from appliance.services.web.contract import ADMIN, Documented, errors
from appliance.services.web.kit import AMBER, GREEN, RED, JsonResponse, ago, not_done, row
from appliance.services.web.parts import WebParts

__all__ = ["admin_parts", "cloud_section", "routes"]





def _not_paired(status: int, message: str) -> Response:
    return not_done(status, message, subtitle="pairing", anchor="cloud", heading="Not paired")


def routes(runtime: Runtime) -> Sequence[BaseRoute]:
    async def form(request: Request) -> Response:
        try:
            fields = await read_form(request)
            await pair_from_web(runtime, fields.get("code", ""), check_admin=lambda: check_form_token(
                fields, runtime, consequence="this box is already paired, so pairing it again needs the admin "
                "token shown in the back office; nothing was changed"))
        except FormError as exc:
            return _not_paired(exc.status, exc.message)
        except PairingFailed as exc:
            return _not_paired(502 if exc.link is not None else 400,
                               f"{exc.message}. The earlier pairing, if any, is unchanged.")
        return RedirectResponse("/#cloud", status_code=303)

    async def api_pair(request: Request) -> Response:
        body = await read_json(request, 4096)
        code = body.get("code") if isinstance(body, dict) else None
        if not isinstance(code, str):
            raise ApiError(400, "expected {\"code\": \"<pairing code>\"}", ["code: required, a string"])
        try:
            await pair_from_web(runtime, code, check_admin=lambda: require_admin(request, runtime))
        except PairingFailed as exc:
            raise ApiError(502 if exc.link is not None else 400, exc.message) from exc
        return JsonResponse({"pairing": describe(runtime.store)})

    return [Route("/pairing", form, methods=["POST"]),
            Documented("/api/pairing", api_pair, method="POST", operation=_PAIR)]


_PAIR: Final = Operation(
    summary="Pair the box with its store (the one-time code from the back office)", tag="cloud",
    description="A box never paired takes a code from anyone (the code is the proof); a paired box needs the admin "
                "token to be paired again. The box asks the platform: 502 when it cannot reach it.",
    body=PairingRequest,
    replies=(Reply(status=200, description="paired", body=PairingAnswer),
             Reply(status=502, description="the platform could not be reached or refused the code", body=Error),
             *errors(400, 401, 408, 413)),
    security=(ADMIN,), security_optional=True)


_FORM: Final = (
    "<form method=post action='/pairing' style='display:block'>"
    "<p><label>Pairing code <input name=code required maxlength=128 autocomplete=off></label> "
    "<label>Admin token <input type=password name=token autocomplete=current-password required></label> "
    "<button>{label}</button></p></form>"
)
# A box never paired: the code alone (the back office then shows the box's admin token).
_FIRST_FORM: Final = (
    "<form method=post action='/pairing' style='display:block'>"
    "<p><label>Pairing code <input name=code required maxlength=128 autocomplete=off></label> "
    "<button>Pair</button></p><p class=muted>The code comes from your back office. Once the box is paired, "
    "the back office shows its admin token: keep it, the homepage asks for it to change anything.</p></form>"
)


async def cloud_section(runtime: Runtime, _: Gettext) -> str:
    info = await cloud_status(runtime)
    now = time.time()
    pairing = info["pairing"]
    rows: list[str] = []
    if pairing["state"] == "unpaired":
        rows.append(row("pairing", "not paired: enter the code from the back office", AMBER))
        form = _FORM.format(label="Pair") if is_claimed(runtime) else _FIRST_FORM
    elif pairing["state"] == "repair_needed":
        rows.append(row("pairing", f"pair again: the platform refused this box's token for store "
                                    f"{html.escape(pairing['store_id'])} (the shop keeps working meanwhile)", RED))
        form = _FORM.format(label="Pair again")
    else:
        rows.append(row("pairing", f"paired with store {html.escape(pairing['store_id'])}", GREEN))
        form = "<details><summary>Pair with another code</summary>" + _FORM.format(label="Pair again") + "</details>"
    if info["pairing_problem"]:
        rows.append(row("saved pairing", html.escape(info["pairing_problem"]), RED))
    if info["blocked"]:
        rows.append(row("cannot sync", html.escape(info["blocked"]), RED))
    sync = info["sync"]
    last_pull = None if sync["last_pull_at"] is None else now - sync["last_pull_at"]
    catalog = ("not synced yet" if last_pull is None
               else f"as of {ago(last_pull)} · cursor {html.escape(str(sync['cursor']))}")
    if sync["snapshot_rows"] is not None:
        catalog += f" · reading the snapshot: {sync['snapshot_rows']} records"
    rows.append(row("catalog", catalog))
    counts = sync["replica"]
    rows.append(row("replica", html.escape(f"{counts['product']} products, {counts['price']} prices, "
                                            f"{counts['stock']} stock records, {counts['media']} media")))
    outbox = info["outbox"]
    waiting = f"{outbox['queued']} waiting"
    if outbox["oldest_unsent_s"] is not None:
        waiting += f" (oldest {ago(outbox['oldest_unsent_s']).removesuffix(' ago')})"
    waiting += f" · {outbox['rejected']} rejected"
    rows.append(row("events up", html.escape(waiting), AMBER if outbox["queued"] or outbox["rejected"] else ""))
    if info["proxy"]:
        rows.append(row("proxy", html.escape(str(info["proxy"]))))
    error = info["last_error"]
    if error:
        retry = [loop["next_attempt_at"] for loop in info["loops"].values() if loop["last_error"]
                 and loop["next_attempt_at"]]
        when = f" (next try in {max(0, int(min(retry) - now))} s)" if retry else ""
        rows.append(row(f"failing ({error['hop']})", html.escape(error["message"] + when)
                         + f"<br><span class=muted>fix: {html.escape(error['fix'])}</span>", RED))
    for rejection in outbox["recent_rejections"]:
        rows.append(row("rejected", html.escape(f"{rejection['id']}: {rejection['reason']}"), RED))
    return (f"<section id=cloud><h2>Cloud</h2><table>{''.join(rows)}</table>{form}"
            f"<p class=muted>{html.escape(info['api_url'])}</p></section>")


async def cloud_status_part(runtime: Runtime) -> dict[str, Any]:
    return {"cloud": await cloud_status(runtime)}


def admin_parts() -> WebParts:
    return WebParts(routes=(routes,), sections=(cloud_section,), status=(cloud_status_part,))

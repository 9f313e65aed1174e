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
from appliance.protocol.text import Number, Text, say
from appliance.services.i18n import Gettext
from appliance.services.pairing import PairingFailed, describe, is_claimed, pair_from_web
from appliance.services.runtime import Runtime
from appliance.services.sync_health import cloud_status
from appliance.services.timestamps import duration
from appliance.services.web.common import ApiError, FormError, check_form_token, read_form, read_json, require_admin
from appliance.services.web.contract import ADMIN, Documented, errors
from appliance.services.web.kit import AMBER, GREEN, RED, JsonResponse, ago, not_done, row
from appliance.services.web.parts import WebParts

__all__ = ["admin_parts", "cloud_section", "routes"]





def _not_paired(request: Request, status: int, message: str) -> Response:
    return not_done(request, status, message, subtitle=Text("pairing"), anchor="cloud", heading=Text("Not paired"))


def routes(runtime: Runtime) -> Sequence[BaseRoute]:
    async def form(request: Request) -> Response:
        try:
            fields = await read_form(request)
            await pair_from_web(runtime, fields.get("code", ""), check_admin=lambda: check_form_token(
                fields, runtime, consequence=Text("this box is already paired, so pairing it again needs the "
                                                  "admin token shown in the back office; nothing was changed")))
        except FormError as exc:
            return _not_paired(request, exc.status, exc.message)
        except PairingFailed as exc:
            return _not_paired(request, 502 if exc.link is not None else 400,
                               Text("{reason}. The earlier pairing, if any, is unchanged.", reason=exc.message))
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


def _form(_: Gettext, label: str, *, first: bool = False) -> str:
    """The pairing form: a box never paired takes the code alone (the back office then
    shows the box's admin token); a paired one needs the admin token too."""
    t_pairing_code = _("Pairing code")
    t_admin_token = _("Admin token")
    esc = html.escape
    token = ("" if first else f"<label>{esc(t_admin_token)} <input type=password name=token "
                              "autocomplete=current-password required></label> ")
    hint = _("The code comes from your back office. Once the box is paired, the back office shows its admin "
             "token: keep it, the homepage asks for it to change anything.")
    after = f"<p class=muted>{esc(hint)}</p>" if first else ""
    return ("<form method=post action='/pairing' style='display:block'>"
            f"<p><label>{esc(t_pairing_code)} <input name=code required maxlength=128 autocomplete=off></label> "
            f"{token}<button>{esc(label)}</button></p>{after}</form>")


async def cloud_section(runtime: Runtime, _: Gettext) -> str:
    t_cloud = _("Cloud")
    t_pair_with_another_code = _("Pair with another code")
    t_pair_again = _("Pair again")
    t_fix = _("fix:")
    esc = html.escape
    info = await cloud_status(runtime)
    now = time.time()
    pairing = info["pairing"]
    rows: list[str] = []
    if pairing["state"] == "unpaired":
        rows.append(row(_("pairing"), esc(_("not paired: enter the code from the back office")), AMBER))
        form = _form(_, _("Pair"), first=not is_claimed(runtime))
    elif pairing["state"] == "repair_needed":
        rows.append(row(_("pairing"), esc(_("pair again: the platform refused this box's token for store {store} "
                                            "(the shop keeps working meanwhile)").format(store=pairing["store_id"])),
                        RED))
        form = _form(_, _("Pair again"))
    else:
        rows.append(row(_("pairing"), esc(_("paired with store {store}").format(store=pairing["store_id"])), GREEN))
        form = (f"<details><summary>{esc(t_pair_with_another_code)}</summary>{_form(_, t_pair_again)}"
                "</details>")
    if info["pairing_problem"]:
        rows.append(row(_("saved pairing"), esc(say(info["pairing_problem"], _)), RED))
    if info["blocked"]:
        rows.append(row(_("cannot sync"), esc(say(info["blocked"], _)), RED))
    sync = info["sync"]
    last_pull = None if sync["last_pull_at"] is None else now - sync["last_pull_at"]
    catalog = (_("not synced yet") if last_pull is None
               else _("as of {ago} · cursor {cursor}").format(ago=say(ago(last_pull), _), cursor=sync["cursor"]))
    if sync["snapshot_rows"] is not None:
        catalog += " · " + _("reading the snapshot: {count} records").format(
            count=say(Number(sync["snapshot_rows"]), _))
    rows.append(row(_("catalog"), esc(catalog)))
    counts = sync["replica"]
    rows.append(row(_("replica"), esc(_("{products} products, {prices} prices, {stock} stock records, {media} media")
                                       .format(products=say(Number(counts["product"]), _),
                                               prices=say(Number(counts["price"]), _),
                                               stock=say(Number(counts["stock"]), _),
                                               media=say(Number(counts["media"]), _)))))
    outbox = info["outbox"]
    waiting = _("{count} waiting").format(count=say(Number(outbox["queued"]), _))
    if outbox["oldest_unsent_s"] is not None:
        waiting += " " + _("(oldest {duration})").format(duration=say(duration(outbox["oldest_unsent_s"]), _))
    waiting += " · " + _("{count} rejected").format(count=say(Number(outbox["rejected"]), _))
    rows.append(row(_("events up"), esc(waiting), AMBER if outbox["queued"] or outbox["rejected"] else ""))
    if info["proxy"]:
        rows.append(row(_("proxy"), esc(str(info["proxy"]))))
    error = info["last_error"]
    if error:
        retry = [loop["next_attempt_at"] for loop in info["loops"].values() if loop["last_error"]
                 and loop["next_attempt_at"]]
        when = (" " + _("(next try in {seconds} s)").format(seconds=max(0, int(min(retry) - now)))) if retry else ""
        rows.append(row(_("failing ({hop})").format(hop=error["hop"]), esc(say(error["message"], _) + when)
                        + f"<br><span class=muted>{esc(t_fix)} {esc(say(error['fix'], _))}</span>", RED))
    for rejection in outbox["recent_rejections"]:
        rows.append(row(_("rejected"), esc(f"{rejection['id']}: {rejection['reason']}"), RED))
    return (f"<section id=cloud><h2>{esc(t_cloud)}</h2><table>{''.join(rows)}</table>{form}"
            f"<p class=muted>{esc(info['api_url'])}</p></section>")


async def cloud_status_part(runtime: Runtime) -> dict[str, Any]:
    return {"cloud": await cloud_status(runtime)}


def admin_parts() -> WebParts:
    return WebParts(routes=(routes,), sections=(cloud_section,), status=(cloud_status_part,))

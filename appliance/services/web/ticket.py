"""The homepage's "Print a status ticket" button (a form: the admin token, no JavaScript)."""

from __future__ import annotations

import html
from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from appliance.protocol.text import Text
from appliance.services.i18n import Gettext
from appliance.services.runtime import Runtime
from appliance.services.ticket import print_ticket
from appliance.services.web.common import FormError, check_form_token, read_form
from appliance.services.web.kit import card, not_done
from appliance.services.web.parts import WebParts

__all__ = ["admin_parts"]


def routes(runtime: Runtime) -> Sequence[BaseRoute]:
    async def print_now(request: Request) -> Response:
        try:
            form = await read_form(request)
            check_form_token(form, runtime, consequence=Text("nothing was printed"))
            if not await print_ticket(runtime):
                raise FormError(409, Text("No receipt printer is adopted: adopt one in Devices first; "
                                          "nothing was printed."))
        except FormError as exc:
            return not_done(request, exc.status, exc.message, subtitle=Text("status ticket"), anchor="ticket",
                            heading=Text("Not printed"))
        return RedirectResponse("/#ticket", status_code=303)

    return [Route("/ticket", print_now, methods=["POST"])]


async def ticket_section(runtime: Runtime, _: Gettext) -> str:
    t_admin_token = _("Admin token")
    t_print_a_status_ticket = _("Print a status ticket")
    esc = html.escape
    what = _("The box's name, address, homepage and pairing, printed on every adopted receipt printer.")
    body = (f"<form method=post action='/ticket'><p>{esc(what)}</p><p><label>{esc(t_admin_token)} "
            "<input type=password name=token autocomplete=current-password required></label> "
            f"<button>{esc(t_print_a_status_ticket)}</button></p></form>")
    return card(_("Status ticket"), body, anchor="ticket")


def admin_parts() -> WebParts:
    return WebParts(routes=(routes,), sections=(ticket_section,))

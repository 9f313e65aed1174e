"""The homepage's Settings card: what a shop needs, behind the admin token.

- The card shows the name, language, address, DNS, NTP, proxy (never its password), the
  proxy's CA, where the admin token comes from, and what the boot partition's setup file
  did. Its forms (plain HTML, no JavaScript) carry the admin token as a password field.
- ``POST /settings/box`` (name, language), ``/settings/network`` (DHCP or a static
  address, DNS, NTP), ``/settings/proxy`` (URL, user, password: blank keeps it; the CA,
  pasted: blank keeps it), ``/settings/admin-token`` (the new token, twice).
- ``POST /api/settings`` with ``Authorization: Bearer <admin token>``: a JSON object with
  the setup file's ``box``, ``network`` and ``proxy`` sections (docs/setup.md).
- ``/api/status`` gets a ``settings`` key (no secrets).

Saving and applying: ``services/settings.py``.
"""

from __future__ import annotations

import html
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import trio
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from appliance.config import ConfigError
from appliance.protocol.admin_api import SettingsAnswer, SettingsRequest
from appliance.protocol.openapi import Operation, Reply
from appliance.protocol.text import Text, join, say
from appliance.services.i18n import Gettext
from appliance.services.owner import CredentialRefused, change_admin_token
from appliance.services.runtime import Runtime
from appliance.services.settings import RESTART_FILE, SettingsRefused, save_settings
from appliance.services.web.common import (
    ApiError,
    FormError,
    check_form_token,
    read_form,
    read_json,
    require_admin,
)
from appliance.services.web.contract import ADMIN, Documented, errors
from appliance.services.web.kit import AMBER, JsonResponse, page, reader, row
from appliance.services.web.parts import WebParts
from appliance.setupfile import SETUP_FILE, SetupStatus, parse_setup_data, read_status
from appliance.storage.owner import CredentialSource

__all__ = ["admin_parts"]

# The proxy form carries a pasted CA (a PEM certificate is 1-2 KB; a short chain more).
PROXY_FORM_BYTES: Final = 16384
_SOURCES: Final = {
    CredentialSource.OWNER: Text("the owner's: shown in the back office since pairing, or set on this page"),
    CredentialSource.GENERATED: Text("made at first boot: pair the box and the back office shows yours"),
    CredentialSource.CONFIGURATION: Text("set in the configuration file ([admin] token)"),
}


def _list(text: str) -> list[str]:
    return [item for item in re.split(r"[\s,;]+", text.strip()) if item]


def _sections(kind: str, form: dict[str, str]) -> dict[str, Any]:
    """A homepage form as the setup file's sections."""
    if kind == "box":
        return {"box": {"name": form.get("name", "").strip(), "language": form.get("language", "")}}
    if kind == "network":
        mode = form.get("mode", "dhcp")
        net: dict[str, Any] = {"mode": mode, "dns": _list(form.get("dns", "")), "ntp": _list(form.get("ntp", ""))}
        if mode == "static":
            net.update(address=form.get("address", "").strip(), gateway=form.get("gateway", "").strip())
        return {"network": net}
    proxy = {"url": form.get("url", "").strip()}
    if proxy["url"]:
        proxy.update({k: v for k in ("user", "password") if (v := form.get(k, "").strip())})
        if ca := form.get("ca", "").replace("\r\n", "\n").strip():
            proxy["ca"] = ca + "\n"
    return {"proxy": proxy}


def _done(request: Request, message: Text, lines: Sequence[str], status: int = 200) -> HTMLResponse:
    """The answer of a settings form, in the reader's language (``lines``: Texts or plain
    words, such as a configuration error's path and reason)."""
    language, _ = reader(request)
    items = "".join(f"<li>{html.escape(say(line, _))}</li>" for line in lines)
    back = _("Back to the homepage")
    body = page(_("Store appliance"), _("settings"),
                [f"<section><h2>{html.escape(say(message, _))}</h2><ul>{items}</ul>"
                 f"<p><a href='/#settings'>{html.escape(back)}</a></p></section>"], lang=language)
    return HTMLResponse(body, status_code=status, headers={"Content-Language": language, "Vary": "Accept-Language"})


def routes(runtime: Runtime) -> Sequence[BaseRoute]:
    async def form(request: Request) -> Response:
        kind = request.path_params["kind"]
        try:
            fields = await read_form(request, PROXY_FORM_BYTES if kind == "proxy" else 4096)
            check_form_token(fields, runtime, consequence=Text("nothing was changed"))
            if kind == "admin-token":
                await change_admin_token(runtime, fields.get("new", ""), fields.get("confirm", ""))
                return _done(request, Text("Admin token changed"), [
                    Text("Use the new token from now on. The back office still shows the old one; pairing again "
                         "gives a new one.")])
            lines = await save_settings(runtime, parse_setup_data(_sections(kind, fields)))
        except FormError as exc:
            return _done(request, Text("Nothing was changed"), [exc.message], exc.status)
        except (ConfigError, SettingsRefused, CredentialRefused) as exc:
            return _done(request, Text("Nothing was changed"), exc.errors, 400)
        if not lines:
            return RedirectResponse("/#settings", status_code=303)
        return _done(request, Text("Settings saved"), lines)

    async def api(request: Request) -> Response:
        require_admin(request, runtime)
        body = await read_json(request, PROXY_FORM_BYTES)
        if not isinstance(body, dict) or set(body) - {"box", "network", "proxy"}:
            raise ApiError(400, "expected an object with the setup file's box, network and proxy sections")
        try:
            lines = await save_settings(runtime, parse_setup_data(body))
        except (ConfigError, SettingsRefused) as exc:
            raise ApiError(400, "nothing was changed", exc.errors) from exc
        return JsonResponse({"saved": lines, "settings": await _state(runtime)})

    return [Route("/settings/{kind:str}", form, methods=["POST"]),
            Documented("/api/settings", api, method="POST", operation=_SETTINGS)]


_SETTINGS: Final = Operation(
    summary="Change the box's settings: its name and language, network, proxy (the setup file's sections)",
    tag="settings", body=SettingsRequest,
    replies=(Reply(status=200, description="saved", body=SettingsAnswer), *errors(400, 401, 408, 413)),
    security=(ADMIN,))


def _without_credentials(url: str) -> str:
    """The proxy URL as shown: never its user name or password (they are credentials)."""
    parts = urlsplit(url)
    if not parts.username:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))


def _read(state_dir: Path) -> tuple[SetupStatus | None, bool]:
    return read_status(state_dir), (state_dir / RESTART_FILE).exists()


async def _state(runtime: Runtime) -> dict[str, Any]:
    """The settings in effect (saved ones that wait for the restart: ``pending_restart``)."""
    config = runtime.config
    status, pending = await trio.to_thread.run_sync(_read, Path(config.storage.dir))
    return {
        "name": config.discovery.name, "language": config.admin.language,
        "address": config.network.address or "dhcp", "gateway": config.network.gateway,
        "dns": list(config.wan.dns_servers), "ntp": list(config.wan.ntp_servers),
        "proxy": _without_credentials(config.wan.proxy), "proxy_ca": bool(config.cloud.ca_file),
        "proxy_auth": bool(urlsplit(config.wan.proxy).username),
        "admin_token": str(runtime.admin.source), "pending_restart": pending,
        "setup_file": None if status is None else {"state": status.state, "errors": list(status.errors),
                                                   "applied": list(status.applied),
                                                   "applied_at": status.applied_at or None},
    }


def _row(label: str, value: str) -> str:
    return row(label, html.escape(value))


def _token(_: Gettext) -> str:
    t_admin_token = _("Admin token")
    return (f"<label>{html.escape(t_admin_token)} <input type=password name=token "
            "autocomplete=current-password required></label> ")


_LANGUAGE_NAMES: Final = {"en": "English", "fr": "Français"}  # each in its own language


def _forms(state: dict[str, Any], _: Gettext) -> str:
    t_name_and_language = _("Name and language")
    t_name = _("Name")
    t_language = _("Language")
    t_address = _("Address")
    t_from_the_router_dhcp = _("from the router (DHCP)")
    t_fixed = _("fixed")
    t_router = _("Router")
    t_proxy = _("Proxy")
    t_user = _("User")
    t_password = _("Password")
    t_ca_of_a_proxy = _("CA of a proxy that inspects HTTPS (PEM; blank: keep)")
    t_an_empty_url_removes = _("An empty URL removes the proxy.")
    t_admin_token = _("Admin token")
    t_new = _("New")
    t_again = _("Again")
    t_change = _("Change")
    t_save = _("Save")
    esc = html.escape
    static = state["address"] != "dhcp"
    lang = "".join(f"<option value={code}{' selected' if state['language'] == code else ''}>{label}</option>"
                   for code, label in _LANGUAGE_NAMES.items())
    token, save = _token(_), f"<button>{esc(t_save)}</button>"
    keep = esc(_("blank: keep"), quote=True)
    return (
        f"<details><summary>{esc(t_name_and_language)}</summary><form method=post action='/settings/box'>"
        f"<p><label>{esc(t_name)} <input name=name maxlength=63 value='{esc(state['name'])}'></label> "
        f"<label>{esc(t_language)} <select name=language>{lang}</select></label></p><p>{token}{save}</p>"
        "</form></details>"
        f"<details><summary>{esc(t_address)}</summary><form method=post action='/settings/network'>"
        f"<p><label><input type=radio name=mode value=dhcp{'' if static else ' checked'}> "
        f"{esc(t_from_the_router_dhcp)}</label> <label><input type=radio name=mode value=static"
        f"{' checked' if static else ''}> {esc(t_fixed)}</label></p>"
        f"<p><label>{esc(t_address)} <input name=address placeholder='192.168.1.50/24' "
        f"value='{esc(state['address'] if static else '')}'></label> <label>{esc(t_router)} <input name=gateway "
        f"placeholder='192.168.1.1' value='{esc(state['gateway'])}'></label></p>"
        f"<p><label>DNS <input name=dns value='{esc(' '.join(state['dns']))}'></label> "
        f"<label>NTP <input name=ntp value='{esc(' '.join(state['ntp']))}'></label></p>"
        f"<p>{token}{save}</p></form></details>"
        f"<details><summary>{esc(t_proxy)}</summary><form method=post action='/settings/proxy'>"
        f"<p><label>URL <input name=url placeholder='http://192.168.1.2:3128' "
        f"value='{esc(state['proxy'])}'></label> "
        f"<label>{esc(t_user)} <input name=user autocomplete=off placeholder='{keep}'></label> "
        f"<label>{esc(t_password)} <input type=password name=password autocomplete=new-password "
        f"placeholder='{keep}'></label></p>"
        f"<p><label>{esc(t_ca_of_a_proxy)}<br>"
        "<textarea name=ca rows=3 cols=60></textarea></label></p>"
        f"<p class=muted>{esc(t_an_empty_url_removes)}</p>"
        f"<p>{token}{save}</p></form></details>"
        f"<details><summary>{esc(t_admin_token)}</summary><form method=post action='/settings/admin-token'>"
        f"<p><label>{esc(t_new)} <input type=password name=new autocomplete=new-password required minlength=24>"
        f"</label> <label>{esc(t_again)} <input type=password name=confirm autocomplete=new-password required>"
        f"</label></p><p>{token}<button>{esc(t_change)}</button></p></form></details>"
    )


def _setup_line(setup: dict[str, Any] | None, _: Gettext) -> str:
    if setup is None or (setup["state"] == "absent" and not setup["applied_at"]):
        return _("no {file} on the card").format(file=SETUP_FILE)
    if setup["state"] in ("invalid", "failed"):
        return _("not applied: {errors}").format(errors=say(join("; ", setup["errors"]), _))
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(setup["applied_at"])) if setup["applied_at"] else ""
    what = say(join("; ", setup["applied"]), _) or _("nothing to change")
    return _("applied {when}: {what}").format(when=when, what=what)


async def settings_section(runtime: Runtime, _: Gettext) -> str:
    t_settings = _("Settings")
    state = await _state(runtime)
    address = (_("from the router (DHCP)") if state["address"] == "dhcp"
               else _("{address} via {gateway}").format(address=state["address"], gateway=state["gateway"]))
    router = _("from the router")
    proxy = state["proxy"] or _("none")
    if state["proxy_auth"]:
        proxy += " " + _("with a user name and password")
    if state["proxy_ca"]:
        proxy += " " + _("(with its CA)")
    rows = [
        _row(_("name"), state["name"] or _("(the box's host name)")),
        _row(_("language"), _LANGUAGE_NAMES.get(state["language"], state["language"])),
        _row(_("address"), address),
        _row(_("DNS, NTP"), say(join("; ", [", ".join(state["dns"]) or router, ", ".join(state["ntp"]) or router]), _)),
        _row(_("proxy"), proxy),
        _row(_("admin token"), say(_SOURCES[CredentialSource(state["admin_token"])], _)),
        _row(_("setup file"), _setup_line(state["setup_file"], _)),
    ]
    if state["pending_restart"]:
        rows.append(row(_("saved"), html.escape(
            _("changes saved; the box applies them within a few seconds (or at its next start)")), AMBER))
    return (f"<section id=settings><h2>{html.escape(t_settings)}</h2><table>{''.join(rows)}</table>"
            f"{_forms(state, _)}</section>")


async def settings_status(runtime: Runtime) -> dict[str, Any]:
    return {"settings": await _state(runtime)}


def admin_parts() -> WebParts:
    return WebParts(routes=(routes,), sections=(settings_section,), status=(settings_status,))

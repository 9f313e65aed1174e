"""The shop's settings changed from the homepage: validated, saved, applied.

The same sections as the boot partition's setup file (``box``, ``network``, ``proxy``;
``appliance/setupfile.py``), saved in the same place (``settings.toml`` in the state
directory, merged over the configuration file), so the setup file and the homepage never
disagree about where a setting lives. What applies at once and what does not:

- language: at once (``runtime.config`` is replaced);
- the admin credential: at once (``services/owner.py``; saved 0600 in ``owner.token``);
- the address, DNS, NTP, the proxy and its CA, the name: the box's network, firewall and
  WAN links are rendered from them by root, outside this unprivileged process. Saving
  also leaves :data:`RESTART_FILE`; on the image ``appliance-settings.path`` notices the
  change, renders the network unit and the firewall again, and restarts this process
  (a few seconds; the devices reconnect by themselves). Elsewhere a restart applies them.

Exceptions: :class:`SettingsRefused` (message for the person; nothing was saved).
"""

from __future__ import annotations

import ssl
import tomllib
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from appliance.config import SETTINGS_FILE, ConfigError, to_toml_dict
from appliance.protocol.text import Text
from appliance.protocol.tomlwrite import dumps
from appliance.services.runtime import Runtime
from appliance.setupfile import CA_FILE, SetupFile, effective, merge, summary
from appliance.storage.secrets import write_atomic

__all__ = ["RESTART_FILE", "SettingsRefused", "save_settings"]

# Left in the state directory when saved settings need the root helper and a restart.
RESTART_FILE: Final = "settings-restart"
_HEADER: Final = ("# The shop's settings, from the boot partition's appliance-setup.toml and the homepage;\n"
                  "# merged over /etc/appliance/appliance.toml (docs/setup.md). Written by the box.\n")


class SettingsRefused(Exception):
    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("; ".join(errors))


def _check_ca(pem: str) -> None:
    if not pem:
        return
    try:
        ssl.create_default_context().load_verify_locations(cadata=pem)
    except (ssl.SSLError, ValueError) as exc:
        raise SettingsRefused([Text("proxy.ca: not a certificate the box can use: {error}", error=str(exc))]) from exc


def _save(state_dir: Path, settings: dict[str, Any], ca: str, restart: bool) -> None:
    # The marker first: the root helper wakes on settings.toml and must find it.
    if restart:
        write_atomic(state_dir / RESTART_FILE, "the shop's settings changed\n", mode=0o600)
    if ca:
        write_atomic(state_dir / CA_FILE, ca, mode=0o644)
    write_atomic(state_dir / SETTINGS_FILE, _HEADER + dumps(settings), mode=0o600)


def _read_settings(state_dir: Path) -> dict[str, Any]:
    path = state_dir / SETTINGS_FILE
    try:
        return tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return {}


async def save_settings(runtime: Runtime, setup: SetupFile) -> list[str]:
    """Validate ``setup`` (its ``box``, ``network`` and ``proxy`` sections) against the
    configuration in effect, save it, apply what can be applied at once. Returns what
    changed, in words. :class:`SettingsRefused` when anything is wrong: nothing is saved."""
    if setup.pairing.code or setup.pairing.release:
        raise SettingsRefused([Text("pairing: pair on the homepage's Cloud card; a release needs the card in hand")])
    state_dir = Path(runtime.config.storage.dir)
    ca = setup.proxy.ca if setup.proxy is not None else ""
    if setup.proxy is not None and setup.proxy.ca_file:
        raise SettingsRefused([Text("proxy.ca_file: only in the setup file; paste the CA here instead")])
    _check_ca(ca)
    settings = await trio.to_thread.run_sync(_read_settings, state_dir)
    # The proxy saved last (a proxy change applies on restart), whose password a blank keeps.
    current = settings.get("wan", {}).get("proxy", runtime.config.wan.proxy)
    new = merge(settings, setup, current_proxy=str(current), ca_path=str(state_dir / CA_FILE), keep_ca=True)
    try:
        # The configuration in effect stands in for the file under the settings: the new
        # settings are checked together with everything else the box runs with.
        config = effective(to_toml_dict(runtime.config, mask_secrets=False), new)
    except ConfigError as exc:
        raise SettingsRefused(exc.errors) from exc
    old = runtime.config
    restart = (config.wan, config.network, config.cloud.ca_file, config.discovery.name) != (
        old.wan, old.network, old.cloud.ca_file, old.discovery.name) or bool(ca)
    await trio.to_thread.run_sync(_save, state_dir, new, ca, restart)
    # The one setting of the configuration this process takes at once (this module is the
    # declared writer of runtime.config).
    runtime.config = attrs.evolve(old, admin=attrs.evolve(old.admin, language=config.admin.language))
    return summary(setup) + ([Text("applied at once")] if not restart else
                             [Text("the box applies it within a few seconds and restarts its links")])

"""The first-boot settings file on the boot partition: ``appliance-setup.toml``.

A retailer, or the platform's onboarding tool, edits it on any computer after flashing the
card (the boot partition is FAT, which Windows and macOS open). ``appliance setup apply``
reads it at every boot before the network and the firewall start (docs/setup.md):

1. parse and validate it, with the configuration's rules and path-named errors
   (``network.address: ...``), then validate the configuration it would make;
2. on any error: change nothing, record the errors (the homepage and health show them);
3. else merge it into the shop's settings (``settings.toml`` in the state directory, merged
   over ``/etc/appliance/appliance.toml`` by ``config.load_config``; the homepage's settings
   page writes there too), write the proxy's CA beside it and the network unit, and hand the
   pairing code (and a release) to the running appliance;
4. remove the secrets (pairing code, proxy password) and the one-shot ``release`` from the
   file, keeping the rest and its comments, so the card no longer carries them.

A file applied once and not edited since is not applied again, so settings changed later
on the homepage stay. A section left out keeps the box's current settings; a section given
is applied whole (``[proxy]`` with ``url = ""`` removes the proxy).

This module is the pure part (schema, merge, network unit, scrubbing) plus the status
record; ``appliance/commands/setup.py`` does the file work.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, unquote, urlsplit

import attrs

from appliance.config import (
    Config,
    ConfigError,
    NetworkConfig,
    WanConfig,
    merge_tables,
    parse_config,
    structure_strict,
)
from appliance.protocol.errors import FieldError
from appliance.protocol.text import Text

__all__ = ["CA_FILE", "HANDOFF_FILE", "MAX_BYTES", "NETWORK_UNIT", "SETUP_FILE", "STATUS_FILE", "Handoff",
           "SetupFile", "SetupStatus", "effective", "file_digest", "merge", "network_unit", "parse_setup",
           "parse_setup_data", "read_status", "scrub", "summary", "without_secrets"]

SETUP_FILE: Final = "appliance-setup.toml"
# In the state directory: what the last boot did with the file (no secrets), and the
# pairing code or release handed to the running appliance (0600).
STATUS_FILE: Final = "setup-status.json"
HANDOFF_FILE: Final = "setup-pairing.json"
# In the state directory: the proxy's CA, from the setup file or the homepage.
CA_FILE: Final = "proxy-ca.pem"
# systemd-networkd reads the first matching file in name order: before 20-wired.network.
NETWORK_UNIT: Final = "10-appliance-setup.network"
# A setup file is a page of settings and maybe a CA bundle.
MAX_BYTES: Final = 256 * 1024
_NAME_MAX: Final = 63


def _name(_inst: object, attr: attrs.Attribute[str | None], value: str | None) -> None:
    if value is not None and (len(value) > _NAME_MAX or not value.isprintable()):
        raise FieldError(attr.name, f"at most {_NAME_MAX} printable characters")


def _choice(*choices: str) -> Any:
    def check(_inst: object, attr: attrs.Attribute[str | None], value: str | None) -> None:
        if value is not None and value not in choices:
            raise FieldError(attr.name, f"must be one of {', '.join(choices)}; got {value!r}")

    return check


def _proxy_url(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    # Never echo the value: a pasted URL may carry a password.
    if not value:
        return
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise FieldError(attr.name, "not a valid URL (http://host:port)") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FieldError(attr.name, "must be http://host:port (or https://host:port)")
    if parts.username or parts.password:
        raise FieldError(attr.name, "put the user name and password in user and password, not in the URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise FieldError(attr.name, "a proxy URL has no path or query: http://host:port")
    if port is None:
        raise FieldError(attr.name, "give the proxy's port: http://host:port")


def _code(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    if value and (len(value.strip()) > 128 or not value.strip().isprintable()):
        raise FieldError(attr.name, "at most 128 printable characters")


@attrs.frozen(kw_only=True)
class BoxSection:
    name: str | None = attrs.field(default=None, validator=_name)
    language: str | None = attrs.field(default=None, validator=_choice("en", "fr"))


@attrs.frozen(kw_only=True)
class NetworkSection:
    # The addresses are checked by the configuration they go into (config.NetworkConfig).
    mode: str = attrs.field(default="dhcp", validator=_choice("dhcp", "static"))
    address: str = ""
    gateway: str = ""
    dns: tuple[str, ...] = ()
    ntp: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class ProxySection:
    url: str = attrs.field(default="", validator=_proxy_url)
    user: str = ""
    password: str = attrs.field(default="", repr=False)
    no_proxy: tuple[str, ...] = ()
    # The CA of a proxy that inspects TLS: PEM text here, or a file beside this one.
    ca: str = ""
    ca_file: str = ""


@attrs.frozen(kw_only=True)
class PairingSection:
    code: str = attrs.field(default="", repr=False, validator=_code)
    # Physical access is the proof: forget the store this box is paired with.
    release: bool = False


@attrs.frozen(kw_only=True)
class SetupFile:
    box: BoxSection = attrs.field(factory=BoxSection)
    network: NetworkSection | None = None
    proxy: ProxySection | None = None
    pairing: PairingSection = attrs.field(factory=PairingSection)


def _cross_checks(setup: SetupFile) -> list[str]:
    errors: list[str] = []
    net = setup.network
    if net is not None:
        if net.mode == "static":
            if not net.address:
                errors.append("network.address: required when mode is \"static\" (such as 192.168.1.50/24)")
            if not net.gateway:
                errors.append("network.gateway: required when mode is \"static\" (the shop's router)")
        else:
            errors += [f"network.{k}: only with mode = \"static\"" for k in ("address", "gateway")
                       if getattr(net, k)]
    proxy = setup.proxy
    if proxy is not None:
        if not proxy.url and (proxy.user or proxy.password or proxy.ca or proxy.ca_file or proxy.no_proxy):
            errors.append("proxy.url: required with the other proxy settings (or remove them for no proxy)")
        if proxy.password and not proxy.user:
            errors.append("proxy.password: given without proxy.user")
        if proxy.ca and proxy.ca_file:
            errors.append("proxy.ca_file: give the CA either here or in proxy.ca, not both")
        if proxy.ca and "-----BEGIN CERTIFICATE-----" not in proxy.ca:
            errors.append("proxy.ca: expected PEM text starting with -----BEGIN CERTIFICATE-----")
        if proxy.ca_file and (Path(proxy.ca_file).name != proxy.ca_file or proxy.ca_file.startswith(".")):
            errors.append("proxy.ca_file: the name of a file next to the setup file, such as proxy-ca.pem")
    return errors


def parse_setup(text: str) -> SetupFile:
    """The setup file's text as a :class:`SetupFile`, or :class:`ConfigError` with every
    problem on a path-named line (never echoing a password)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"]) from exc
    return parse_setup_data(data)


def parse_setup_data(data: Mapping[str, Any]) -> SetupFile:
    """Setup-file-shaped data (the file, or the homepage's JSON) as a :class:`SetupFile`."""
    try:
        setup = structure_strict(data, SetupFile, source="setup file")
    except ConfigError as exc:
        raise ConfigError(exc.errors + _address_errors(data)) from exc
    errors = _cross_checks(setup) or _address_errors(data)
    if errors:
        raise ConfigError(errors)
    return setup


def _address_errors(data: Mapping[str, Any]) -> list[str]:
    """The addresses checked as the configuration will check them, so a file with other
    mistakes too gets every line at once."""
    net = data.get("network")
    if not isinstance(net, Mapping):
        return []
    errors: list[str] = []
    checks: list[tuple[type, dict[str, Any], dict[str, str]]] = [
        (WanConfig, {k: list(v) for k, v in (("dns_servers", net.get("dns")), ("ntp_servers", net.get("ntp")))
                     if isinstance(v, list) and all(isinstance(i, str) for i in v)},
         {"dns_servers": "dns", "ntp_servers": "ntp"})]
    if net.get("mode") == "static":
        checks.append((NetworkConfig, {k: net[k] for k in ("address", "gateway") if isinstance(net.get(k), str)},
                       {"address": "address", "gateway": "gateway"}))
    for cls, values, names in checks:
        try:
            structure_strict(values, cls, source="network")
        except ConfigError as exc:
            for line in exc.errors:
                path, _, rest = line.partition(": ")
                if path in names and "required when" not in rest:
                    errors.append(f"network.{names[path]}: {rest}")
    return errors


def _proxy_with_credentials(proxy: ProxySection, current: str, *, keep_user: bool = False) -> str:
    """``[wan] proxy`` for ``proxy``. A user given without a password (the file was scrubbed
    after an earlier boot) keeps the password the box has for the same proxy and user;
    with ``keep_user`` (the homepage, which never shows them) no user keeps both."""
    old = urlsplit(current) if current else None
    new = urlsplit(proxy.url)
    same_proxy = old is not None and (old.hostname, old.port) == (new.hostname, new.port)
    user, password = proxy.user, proxy.password
    if keep_user and same_proxy and old is not None and not user and not password:
        user, password = unquote(old.username or ""), unquote(old.password or "")
    if not proxy.url or not user:
        return proxy.url
    if not password and same_proxy and old is not None and unquote(old.username or "") == user:
        password = unquote(old.password or "")
    auth = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
    return f"{proxy.url.rstrip('/').replace('://', '://' + auth + '@', 1)}"


# Where a setting of the merged configuration comes from in the setup file, for errors.
_SETUP_PATHS: Final = {"wan.dns_servers": "network.dns", "wan.ntp_servers": "network.ntp",
                       "wan.proxy": "proxy.url", "wan.no_proxy": "proxy.no_proxy", "discovery.name": "box.name",
                       "admin.language": "box.language", "network.address": "network.address",
                       "network.gateway": "network.gateway"}


def merge(settings: Mapping[str, Any], setup: SetupFile, *, current_proxy: str, ca_path: str,
          keep_ca: bool = False) -> dict[str, Any]:
    """The shop's settings (``settings.toml`` data) with the setup file merged in.

    ``current_proxy``: the proxy in effect, whose password a scrubbed file keeps.
    ``ca_path``: where the proxy's CA is written, when the setup file gives one.
    ``keep_ca``: a proxy section without a CA keeps the one the box has, and one without a
    user keeps the user and password the box has for the same proxy (the homepage's form,
    which never shows them again; the setup file gives its section whole)."""
    out: dict[str, Any] = json.loads(json.dumps(dict(settings)))  # a deep copy of plain TOML data

    def section(name: str) -> dict[str, Any]:
        table: dict[str, Any] = out.setdefault(name, {})
        return table

    if setup.box.name is not None:
        section("discovery")["name"] = setup.box.name
    if setup.box.language is not None:
        section("admin")["language"] = setup.box.language
    if setup.network is not None:
        net = setup.network
        static = net.mode == "static"
        section("network").update(address=net.address if static else "", gateway=net.gateway if static else "")
        section("wan").update(dns_servers=list(net.dns), ntp_servers=list(net.ntp))
    if setup.proxy is not None:
        section("wan").update(proxy=_proxy_with_credentials(setup.proxy, current_proxy, keep_user=keep_ca),
                              no_proxy=list(setup.proxy.no_proxy))
        given = bool(setup.proxy.ca or setup.proxy.ca_file)
        for name in ("cloud", "orders", "support"):
            if given:
                section(name)["ca_file"] = ca_path
            elif not (keep_ca and setup.proxy.url) and out.get(name, {}).get("ca_file") == ca_path:
                del out[name]["ca_file"]
    return out


def effective(base: Mapping[str, Any], settings: Mapping[str, Any]) -> Config:
    """The configuration the box runs with (the file, then the shop's settings), or
    :class:`ConfigError` with lines named by the setup file's paths where they come from it."""
    try:
        return parse_config(merge_tables(base, settings), source="the configuration with the shop's settings")
    except ConfigError as exc:
        lines = []
        for line in exc.errors:
            path, sep, rest = line.partition(": ")
            named = _SETUP_PATHS.get(path)
            lines.append(f"{named}: {rest}" if sep and named else f"once merged into the configuration: {line}")
        raise ConfigError(lines) from exc


def network_unit(config: Config) -> str:
    """The systemd-networkd unit for the configuration's ``[network]`` and its DNS and NTP
    servers (every wired interface, like the image's default ``20-wired.network``, which
    it comes before)."""
    net, wan = config.network, config.wan
    lines = ["# Written by `appliance setup apply` from the box's settings (docs/setup.md).",
             "[Match]", "Name=en* eth*", "", "[Network]"]
    lines += [f"Address={net.address}", f"Gateway={net.gateway}"] if net.address else ["DHCP=yes"]
    lines += [f"DNS={a}" for a in wan.dns_servers] + [f"NTP={a}" for a in wan.ntp_servers]
    lines += ["LLMNR=no", "MulticastDNS=no"]
    if not net.address and (wan.dns_servers or wan.ntp_servers):
        # The firewall lets DNS and NTP reach only the servers named: use no others.
        lines += ["", "[DHCPv4]"]
        lines += ["UseDNS=no"] if wan.dns_servers else []
        lines += ["UseNTP=no"] if wan.ntp_servers else []
    return "\n".join(lines) + "\n"


_SECRET_LINE: Final = {
    "pairing": {"code": "the pairing code", "release": "the release"},
    "proxy": {"password": "the proxy password"},
}
_TABLE: Final = re.compile(r"^\s*\[\s*([A-Za-z0-9_-]+)\s*\]\s*(#.*)?$")
_ASSIGN: Final = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")


def scrub(text: str, *, when: str) -> tuple[str, list[str]]:
    """``text`` without the pairing code, the proxy password and ``release``: each line that
    sets one becomes a comment saying it was applied ``when``. Returns the new text and what
    was removed. Falls back to no change (an empty list) when the result would not parse
    back to the same settings minus those keys; the caller then rewrites the file whole."""
    out: list[str] = []
    removed: list[str] = []
    table = ""
    for line in text.splitlines(keepends=True):
        if m := _TABLE.match(line):
            table = m.group(1)
        elif (m := _ASSIGN.match(line)) and m.group(1) in _SECRET_LINE.get(table, {}):
            key = m.group(1)
            removed.append(f"{table}.{key}")
            eol = "\r\n" if line.endswith("\r\n") else "\n"
            out.append(f"# {key} = ... ({_SECRET_LINE[table][key]}: applied {when}, then removed from this file){eol}")
            continue
        out.append(line)
    new = "".join(out)
    try:
        before, after = tomllib.loads(text), tomllib.loads(new)
    except tomllib.TOMLDecodeError:
        return text, []
    for path in removed:
        section, key = path.split(".")
        before.get(section, {}).pop(key, None)
    leftover = [f"{s}.{k}" for s, keys in _SECRET_LINE.items() for k in keys if k in after.get(s, {})
                and not (k == "release" and after[s][k] is False)]
    if before != after or leftover:
        return text, []
    return new, removed


def without_secrets(text: str) -> dict[str, Any]:
    """The file's data without the secrets and ``release``: what a whole rewrite keeps."""
    data = tomllib.loads(text)
    for section, keys in _SECRET_LINE.items():
        for key in keys:
            data.get(section, {}).pop(key, None)
    return data


def file_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def summary(setup: SetupFile) -> list[str]:
    """What the file sets, in words (Texts: the reader's language), without secrets (the
    homepage and health show it)."""
    lines: list[str] = []
    if setup.box.name is not None:
        lines.append(Text("name {name}", name=repr(setup.box.name)))
    if setup.box.language is not None:
        lines.append(Text("language {language}", language=setup.box.language))
    net = setup.network
    if net is not None:
        lines.append(Text("static address {address} via {gateway}", address=net.address, gateway=net.gateway)
                     if net.mode == "static" else Text("address by DHCP"))
        if net.dns:
            lines.append(Text("DNS {servers}", servers=", ".join(net.dns)))
        if net.ntp:
            lines.append(Text("NTP {servers}", servers=", ".join(net.ntp)))
    proxy = setup.proxy
    if proxy is not None:
        if proxy.url:
            with_user = Text(" with a user name") if proxy.user else ""
            with_ca = Text(" with its CA") if proxy.ca or proxy.ca_file else ""
            lines.append(Text("proxy {url}{user}{ca}", url=proxy.url, user=with_user, ca=with_ca))
        else:
            lines.append(Text("no proxy"))
    if setup.pairing.release:
        lines.append(Text("released from its store"))
    if setup.pairing.code:
        lines.append(Text("pairing code given"))
    return lines


# --- the status and the hand-off, in the state directory ------------------------------------


@attrs.frozen(kw_only=True)
class SetupStatus:
    """What the last boot did with the setup file. ``state``: applied, unchanged, invalid,
    failed (a write failed: the previous settings stay), absent."""

    state: str
    file: str = ""
    checked_at: float = 0.0
    errors: tuple[str, ...] = ()
    applied: tuple[str, ...] = ()
    scrubbed: tuple[str, ...] = ()
    applied_at: float = 0.0
    applied_digest: str = ""

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), indent=2, sort_keys=True) + "\n"


def read_status(state_dir: Path) -> SetupStatus | None:
    """The last status, None if there is none or it cannot be read."""
    try:
        data = json.loads((state_dir / STATUS_FILE).read_text("utf-8"))
        fields = {f.name for f in attrs.fields(SetupStatus)}
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields}
        return SetupStatus(**values)
    except (OSError, ValueError, TypeError):
        return None


@attrs.frozen(kw_only=True)
class Handoff:
    """What the running appliance must do with the pairing once it starts."""

    release: bool = False
    code: str = attrs.field(default="", repr=False)
    problem: str = ""  # why the code did not pair the box (the homepage shows it)

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), sort_keys=True) + "\n"

    @classmethod
    def read(cls, state_dir: Path) -> Handoff | None:
        try:
            data = json.loads((state_dir / HANDOFF_FILE).read_text("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return cls(problem="the pairing hand-off from the setup file cannot be read")
        if not isinstance(data, dict):
            return cls(problem="the pairing hand-off from the setup file cannot be read")
        return cls(release=data.get("release") is True, code=str(data.get("code") or ""),
                   problem=str(data.get("problem") or ""))

"""The firewall: the rendered ruleset from the config, the loaded one from ``nft``, and a check.

:func:`policy_from_config` is the one place the port map and the config become a
:class:`~appliance.protocol.firewall.Policy`: every port comes from
:data:`~appliance.config.PORT_ROLES` and :class:`~appliance.config.Ports`.

:func:`read_loaded` runs ``nft list table inet appliance`` (blocking: call it from a
worker thread) and says whether the table is loaded, not loaded, or cannot be read, with
a fix for a person. :func:`firewall_checks` is the health check ``firewall``; it is
registered only on a box that carries the rendered ruleset (:data:`RENDERED_PATH`, put
there by the image), so a developer's machine without the firewall does not warn.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import urllib.parse
from functools import partial
from pathlib import Path
from typing import Final

import attrs

from appliance import __version__
from appliance.config import PORT_ROLES, Config, Direction
from appliance.health.registry import CheckFn
from appliance.protocol.firewall import DeviceRule, FirewallError, FirewallProxy, Policy, Service, build, render
from appliance.protocol.firewall_compare import RulesetParseError, compare, counter_values, parse
from appliance.protocol.health import Check, Status
from appliance.protocol.redact import redact_url
from appliance.protocol.text import Text

__all__ = [
    "DHCP_LEASES",
    "RENDERED_PATH",
    "SNAPSHOT_PATH",
    "Loaded",
    "dhcp_servers",
    "firewall_check",
    "firewall_checks",
    "policy_from_config",
    "read_loaded",
    "render_config",
]

# Where the image installs the rendered table (included by /etc/nftables.conf).
RENDERED_PATH: Final = Path("/etc/nftables.d/appliance.nft")
# The service has no CAP_NET_ADMIN, which listing needs: nftables.service (root) leaves a
# copy of what it loaded here (image/files/etc/systemd/system/nftables.service.d/).
SNAPSHOT_PATH: Final = Path("/run/appliance-firewall/loaded.nft")
NFT_LIST: Final = ("list", "table", "inet", "appliance")
_DEFAULT_PROXY_PORTS: Final = {"http": 80, "https": 443}
# Where systemd-networkd records each interface's DHCP lease (DNS=, NTP= lines): the image's
# network stack. The image renders the ruleset again when a lease changes.
DHCP_LEASES: Final = Path("/run/systemd/netif/leases")


def dhcp_servers(leases: Path | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(dns, ntp)``: the server addresses DHCP gave, in lease order (names are skipped:
    nft needs addresses). Empty when there is no lease (at boot, or another network stack)."""
    dns: dict[str, None] = {}
    ntp: dict[str, None] = {}
    try:
        files = sorted((leases or DHCP_LEASES).iterdir())
    except OSError:
        return (), ()
    for lease in files:
        try:
            text = lease.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for line in text.splitlines():
            key, _, value = line.partition("=")
            if key not in ("DNS", "NTP"):
                continue
            for item in value.split():
                try:
                    ipaddress.ip_address(item)
                except ValueError:
                    continue
                (dns if key == "DNS" else ntp)[item] = None
    return tuple(dns), tuple(ntp)


def policy_from_config(config: Config, *, leases: Path | None = None) -> Policy:
    """The firewall policy of ``config``; raises FirewallError for a proxy URL it cannot use.

    DNS and NTP go to ``[wan] dns_servers``/``ntp_servers``, else to the servers DHCP gave
    (:func:`dhcp_servers`), else anywhere (a box whose time comes from a pool by name)."""
    ports = config.lan.ports
    services = tuple(
        Service(role=r.role, transport="tcp" if r.transport == "tcp" else "udp", port=getattr(ports, r.role),
                inbound=r.direction in (Direction.IN, Direction.BOTH),
                outbound=r.direction in (Direction.OUT, Direction.BOTH))
        for r in PORT_ROLES
        # Port 0 means "any free port" (tests, side-by-side runs): nothing to open.
        if getattr(ports, r.role)
    )
    proxy = None
    if config.wan.proxy:
        url = urllib.parse.urlsplit(config.wan.proxy)
        try:
            port = url.port or _DEFAULT_PROXY_PORTS[url.scheme]
        except (ValueError, KeyError) as exc:
            raise FirewallError(f"wan.proxy: cannot read the proxy's port in {redact_url(config.wan.proxy)!r}") \
                from exc
        if not url.hostname:
            raise FirewallError(f"wan.proxy: no host in {redact_url(config.wan.proxy)!r}")
        proxy = FirewallProxy(host=url.hostname, port=port)
    devices = tuple(DeviceRule(name=d.id, address=d.address, port=d.port)
                    for d in config.devices if d.port != ports.device)
    dhcp_dns, dhcp_ntp = dhcp_servers(leases)
    listeners = sum(1 for s in services if s.inbound and s.transport == "tcp")
    return Policy(services=services, lan_prefixes=config.lan.prefixes,
                  dns_servers=config.wan.dns_servers or dhcp_dns, ntp_servers=config.wan.ntp_servers or dhcp_ntp,
                  proxy=proxy, devices=devices,
                  # Never below what the listeners admit from one address, all together.
                  max_connections_per_source=config.http.max_connections_per_source * listeners)


def render_config(config: Config, source: str) -> str:
    """The nftables file for ``config`` (``source`` names where the config came from)."""
    return render(policy_from_config(config), header=(
        f"Rendered by `appliance firewall render` (firmware {__version__}) from {source}.",
        "Do not edit: it is rendered again from the configuration at every boot.",
    ))


@attrs.frozen(kw_only=True)
class Loaded:
    """What ``nft`` said: the listing, or that the table is absent, or why it cannot be read."""

    text: str = ""
    absent: bool = False
    error: str = ""  # non-empty: cannot read
    fix: str = ""
    snapshot: bool = False  # read from SNAPSHOT_PATH: as loaded at boot, not live
    permission: bool = False  # nft refused: no CAP_NET_ADMIN


def read_snapshot(path: Path = SNAPSHOT_PATH) -> Loaded | None:
    """The listing nftables.service saved when it loaded the ruleset, if there is one."""
    try:
        return Loaded(text=path.read_text(encoding="utf-8"), snapshot=True)
    except (OSError, UnicodeDecodeError):
        return None


def read_loaded(timeout_s: float = 5.0, nft: str = "nft") -> Loaded:
    """List the loaded table. Blocking (a subprocess): run it in a worker thread."""
    binary = shutil.which(nft)
    if binary is None:
        return Loaded(error=Text("the nft program is not installed"), fix=Text("install the nftables package"))
    try:
        proc = subprocess.run([binary, *NFT_LIST], capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return Loaded(error=Text("nft did not answer within {seconds} s", seconds=format(timeout_s, "g")),
                      fix=Text("check the system's load and logs"))
    except OSError as exc:
        return Loaded(error=Text("cannot run nft: {error}", error=str(exc)),
                      fix=Text("check the nftables installation"))
    if proc.returncode == 0:
        return Loaded(text=proc.stdout)
    err = " ".join(proc.stderr.split())
    if "No such file or directory" in err:
        return Loaded(absent=True)
    if "Operation not permitted" in err or "Permission denied" in err:
        return Loaded(error=Text("reading the ruleset needs CAP_NET_ADMIN"), permission=True,
                      fix=Text("run `sudo appliance firewall check` as root"))
    return Loaded(error=Text("nft failed: {error}", error=err or str(proc.returncode)),
                  fix=Text("run `nft list ruleset` as root to see why"))


def differences(config: Config, loaded: Loaded) -> list[str]:
    """How the loaded table differs from the one rendered from ``config`` (``loaded`` readable)."""
    if loaded.absent:
        return [Text("the table inet appliance is not loaded: the box is not protected by its firewall")]
    return compare(build(policy_from_config(config)), parse(loaded.text))


def firewall_check(config: Config, rendered: Path = RENDERED_PATH) -> CheckFn | None:
    """The ``firewall`` check for the health registry, or None on a machine without the
    rendered ruleset (a developer's machine, a test run): nothing there to compare."""
    if not rendered.is_file():
        return None
    return partial(firewall_checks, config)


async def firewall_checks(config: Config, *, timeout_s: float = 4.0, snapshot: Path = SNAPSHOT_PATH) -> list[Check]:
    """The ``firewall`` check: the loaded ruleset against the one rendered from ``config``.

    Live when nft lets us list it; else the copy nftables.service saved at load time.
    """
    import trio  # here, not at the top: the boot-time renderer imports this module without it

    loaded = await trio.to_thread.run_sync(read_loaded, timeout_s)
    if loaded.permission:
        saved: Loaded | None = await trio.to_thread.run_sync(read_snapshot, snapshot)
        loaded = saved or loaded
    if loaded.error:
        return [Check(name="firewall", status=Status.WARN, message=Text("cannot read the firewall: {error}",
                                                                        error=loaded.error),
                      fix=loaded.fix)]
    try:
        diffs = differences(config, loaded)
    except RulesetParseError as exc:
        return [Check(name="firewall", status=Status.WARN, message=Text("cannot read the firewall: {error}",
                                                                        error=str(exc)),
                      fix=Text("run `sudo appliance firewall check` to compare it by hand"))]
    except FirewallError as exc:
        return [Check(name="firewall", status=Status.FAIL, message=Text("the firewall cannot be rendered: {error}",
                                                                        error=str(exc)),
                      fix=Text("correct the configuration, then restart the appliance-firewall service"))]
    if loaded.absent:
        return [Check(name="firewall", status=Status.FAIL, message=diffs[0],
                      fix=Text("systemctl restart appliance-firewall nftables"))]
    if diffs:
        return [Check(name="firewall", status=Status.WARN,
                      message=Text("the loaded firewall differs from the port map in {count} way(s): {first}",
                                   count=len(diffs), first=diffs[0]),
                      fix=Text("systemctl restart appliance-firewall nftables; `appliance firewall check` lists all"),
                      data={"differences": diffs})]
    data: dict[str, object] = {"source": "copy saved at load" if loaded.snapshot else "live"}
    if not loaded.snapshot:
        data["dropped"] = {name: packets for name, (packets, _) in counter_values(loaded.text).items()}
    message = (Text("the loaded firewall matches the port map (as loaded at boot)") if loaded.snapshot
               else Text("the loaded firewall matches the port map"))
    return [Check(name="firewall", status=Status.OK, message=message,
                  data=data)]

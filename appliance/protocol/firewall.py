"""The nftables ruleset of the box, rendered from a :class:`Policy` (sans-I/O).

:func:`render` turns a policy (the port map and the LAN, DNS, NTP and proxy settings,
see ``appliance.health.firewall.policy_from_config``) into the text of one nftables
table, ``table inet appliance``, laid out the way ``nft list table`` prints it.
:mod:`appliance.protocol.firewall_compare` reads that layout back (from the rendered text
or from ``nft list``) and says, in words, how a loaded table differs from the rendered one.

What the table allows, and nothing else (docs/architecture.md §2, §9):

- in: loopback; replies (established/related); DHCP and DHCPv6 replies; ICMP errors and
  the ICMPv6 needed for neighbour discovery; ping from the LAN; each TCP listener of the
  port map and UDP discovery, from the LAN prefixes only; new TCP connections to the
  listeners beyond ``max_connections_per_source`` open from one address are dropped
  (``ct count``, kept in the dynamic sets ``per_source_v4``/``_v6``) before they cost the
  process a descriptor;
- out: loopback; replies; DHCP; DNS and NTP (to the configured or DHCP-given servers, else
  anywhere); HTTPS on 443 anywhere, or, with a proxy, only the proxy's address and port;
  the device port, UDP discovery (and its broadcast) to the LAN only; a discovery reply
  only to an unprivileged port (no reflection onto a LAN service) and no longer than a
  discovery datagram;
- forward: nothing.

Everything else is dropped and counted in the named counters ``dropped_in``,
``dropped_out`` and ``dropped_forward`` (a health check reads them), with a rate-limited
log line. Every rule carries a comment unique in its chain: it names the rule when two
rulesets are compared.

Errors: :class:`FirewallError` (a policy that cannot be rendered); its subclass
``RulesetParseError`` lives with the parser.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, Literal

import attrs

__all__ = [
    "COUNTERS",
    "TABLE",
    "Chain",
    "DeviceRule",
    "FirewallError",
    "FirewallProxy",
    "Policy",
    "Rule",
    "Ruleset",
    "Service",
    "build",
    "format_ruleset",
    "render",
]

TABLE: Final = "appliance"  # always family inet: one table for IPv4 and IPv6
COUNTERS: Final = ("dropped_in", "dropped_out", "dropped_forward")
# A discovery datagram is at most 1,200 bytes (docs/discovery.md) plus the 8-byte UDP header.
_DISCOVERY_UDP_LENGTH: Final = 1208
# Addresses tracked at once by a ct count set (one element per LAN address with connections).
_DYNAMIC_SET_SIZE: Final = 65535
# Well-known ports of the base protocols (not the appliance's own: those come from the map).
_HTTPS: Final = 443
_DNS: Final = 53
_NTP: Final = 123

Family = Literal["ip", "ip6"]
_SUFFIX: Final[dict[Family, str]] = {"ip": "v4", "ip6": "v6"}  # set names: lan_v4, dns_v6...


class FirewallError(ValueError):
    """The policy cannot be rendered into a ruleset."""


# --- the policy: what the renderer is told ---------------------------------------------


@attrs.frozen(kw_only=True)
class Service:
    """One entry of the port map, as the firewall sees it."""

    role: str
    transport: Literal["tcp", "udp"]
    port: int
    inbound: bool  # LAN -> box
    outbound: bool  # box -> LAN


@attrs.frozen(kw_only=True)
class FirewallProxy:
    """The HTTP proxy every WAN path goes through. ``host`` is an address or a name."""

    host: str
    port: int


@attrs.frozen(kw_only=True)
class DeviceRule:
    """A device declared in config whose channel port differs from the port map's."""

    name: str
    address: str
    port: int


@attrs.frozen(kw_only=True)
class Policy:
    services: tuple[Service, ...]
    lan_prefixes: tuple[str, ...]
    dns_servers: tuple[str, ...] = ()  # empty: DNS to any address
    ntp_servers: tuple[str, ...] = ()  # empty: NTP to any address
    proxy: FirewallProxy | None = None  # None: HTTPS 443 to any address
    devices: tuple[DeviceRule, ...] = ()
    # New TCP connections to the listeners from one LAN address beyond this many open are
    # dropped (0: no limit).
    max_connections_per_source: int = 0


# --- the ruleset: what nft lists -------------------------------------------------------


@attrs.frozen(kw_only=True)
class Rule:
    text: str  # the statement without its comment, e.g. 'ip saddr @lan_v4 tcp dport 80 accept'
    comment: str  # unique within its chain: the rule's name

    def line(self) -> str:
        return f'{self.text} comment "{self.comment}"' if self.comment else self.text


@attrs.frozen(kw_only=True)
class Chain:
    name: str
    hook: str  # 'type filter hook input priority filter'
    policy: str  # 'drop' or 'accept'
    rules: tuple[Rule, ...]


@attrs.frozen(kw_only=True)
class Ruleset:
    counters: tuple[str, ...]
    sets: Mapping[str, tuple[str, tuple[str, ...]]]  # name -> (type, elements)
    chains: tuple[Chain, ...]
    # Anything else a listing holds (table flags, maps, quotas...): never rendered.
    extras: tuple[str, ...] = ()
    # Sets the rules fill (ct count per source): name -> type; their elements come and go.
    dynamic_sets: Mapping[str, str] = attrs.field(factory=dict)

    def chain(self, name: str) -> Chain | None:
        return next((c for c in self.chains if c.name == name), None)


# --- rendering -------------------------------------------------------------------------


def _networks(items: Iterable[str], what: str) -> dict[Family, list[str]]:
    """Split by family and collapse overlaps (nft refuses overlapping interval elements)."""
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for item in items:
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError as exc:
            raise FirewallError(f"{what}: not an IP address or network: {item!r}") from exc
        (v4 if isinstance(net, ipaddress.IPv4Network) else v6).append(net)  # type: ignore[arg-type]

    def text(nets: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> list[str]:
        return [str(n.network_address) if n.prefixlen == n.max_prefixlen else str(n) for n in nets]

    return {"ip": text(list(ipaddress.collapse_addresses(v4))),
            "ip6": text(list(ipaddress.collapse_addresses(v6)))}


def _port_ok(port: int, what: str) -> None:
    if not 1 <= port <= 65535:
        raise FirewallError(f"{what}: port must be between 1 and 65535, got {port}")


class _Builder:
    def __init__(self) -> None:
        self.sets: dict[str, tuple[str, tuple[str, ...]]] = {}
        self.dynamic_sets: dict[str, str] = {}
        self.rules: dict[str, list[Rule]] = {"input": [], "output": [], "forward": []}
        self._comments: set[tuple[str, str]] = set()

    def add_set(self, name: str, family: Family, elements: Sequence[str]) -> str | None:
        """Declare a set (or nothing when empty) and return how a rule refers to it."""
        if not elements:
            return None
        self.sets[name] = ("ipv4_addr" if family == "ip" else "ipv6_addr", tuple(elements))
        return f"@{name}"

    def rule(self, chain: str, text: str, comment: str) -> None:
        if (chain, comment) in self._comments:
            raise FirewallError(f"two rules of chain {chain} would be named {comment!r}")
        self._comments.add((chain, comment))
        self.rules[chain].append(Rule(text=text, comment=comment))

    def per_family(self, chain: str, direction: Literal["saddr", "daddr"], sets: Mapping[Family, str | None],
                   match: str, comment: str) -> None:
        """One rule per address family that has addresses; none when neither has."""
        for family, ref in sets.items():
            if ref is not None:
                suffix = " (IPv6)" if family == "ip6" else ""
                self.rule(chain, f"{family} {direction} {ref} {match}", comment + suffix)


def build(policy: Policy) -> Ruleset:
    """The ruleset for ``policy``; raises :class:`FirewallError` when it cannot be built."""
    b = _Builder()
    lan = _networks(policy.lan_prefixes, "lan.prefixes")
    if not lan["ip"] and not lan["ip6"]:
        raise FirewallError("lan.prefixes is empty: no device could reach the box")
    lan_sets: dict[Family, str | None] = {f: b.add_set(f"lan_{_SUFFIX[f]}", f, lan[f]) for f in ("ip", "ip6")}

    # Inbound.
    b.rule("input", 'iif "lo" accept', "loopback")
    b.rule("input", "ct state established,related accept", "replies")
    b.rule("input", 'ct state invalid counter name "dropped_in" drop', "invalid")
    b.rule("input", "udp sport 67 udp dport 68 accept", "dhcp replies")
    b.rule("input", "udp sport 547 udp dport 546 accept", "dhcpv6 replies")
    b.rule("input", "icmp type { destination-unreachable, time-exceeded, parameter-problem } accept", "icmp errors")
    b.rule("input", "icmpv6 type { destination-unreachable, packet-too-big, time-exceeded, parameter-problem, "
           "mld-listener-query, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert } accept",
           "icmpv6 errors and neighbour discovery")
    b.per_family("input", "saddr", {"ip": lan_sets["ip"]}, "icmp type echo-request accept", "lan in: ping")
    b.per_family("input", "saddr", {"ip6": lan_sets["ip6"]}, "icmpv6 type echo-request accept", "lan in: ping")
    tcp_in = [svc.port for svc in policy.services if svc.inbound and svc.transport == "tcp"]
    if policy.max_connections_per_source and tcp_in:
        limit = policy.max_connections_per_source
        ports = ", ".join(str(p) for p in tcp_in)
        for fam, ref in lan_sets.items():
            if ref is None:
                continue
            name = f"per_source_{_SUFFIX[fam]}"
            b.dynamic_sets[name] = "ipv4_addr" if fam == "ip" else "ipv6_addr"
            b.rule("input", f"{fam} saddr {ref} tcp dport {{ {ports} }} ct state new add @{name} "
                   f"{{ {fam} saddr ct count over {limit} }} counter name \"dropped_in\" drop",
                   f"lan in: over {limit} connections from one address" + (" (IPv6)" if fam == "ip6" else ""))
    for svc in policy.services:
        if svc.inbound:
            _port_ok(svc.port, f"lan.ports.{svc.role}")
            b.per_family("input", "saddr", lan_sets, f"{svc.transport} dport {svc.port} accept",
                         f"lan in: {svc.role} {svc.port}/{svc.transport}")
    b.rule("input", 'limit rate 5/minute log prefix "appliance drop in: " level info', "log dropped in")
    b.rule("input", 'counter name "dropped_in" drop', "drop in")

    # Outbound.
    b.rule("output", 'oif "lo" accept', "loopback")
    b.rule("output", "ct state established,related accept", "replies")
    b.rule("output", 'ct state invalid counter name "dropped_out" drop', "invalid")
    b.rule("output", "udp sport 68 udp dport 67 accept", "dhcp")
    b.rule("output", "udp sport 546 udp dport 547 accept", "dhcpv6")
    b.rule("output", "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, "
           "mld2-listener-report } accept", "icmpv6 neighbour discovery")
    for what, servers, proto_ports in (("dns", policy.dns_servers, (("udp", _DNS), ("tcp", _DNS))),
                                       ("ntp", policy.ntp_servers, (("udp", _NTP),))):
        for proto, port in proto_ports:
            comment = f"wan out: {what} {port}/{proto}"
            if not servers:
                b.rule("output", f"{proto} dport {port} accept", comment)
                continue
            nets = _networks(servers, f"wan.{what}_servers")
            refs: dict[Family, str | None] = {
                f: b.add_set(f"{what}_{_SUFFIX[f]}", f, nets[f]) for f in ("ip", "ip6")}
            b.per_family("output", "daddr", refs, f"{proto} dport {port} accept", comment)
    if policy.proxy is None:
        b.rule("output", f"tcp dport {_HTTPS} accept", f"wan out: https {_HTTPS}/tcp")
    else:
        _proxy_rules(b, policy.proxy, lan_sets)
    for svc in policy.services:
        if svc.outbound:
            _port_ok(svc.port, f"lan.ports.{svc.role}")
            b.per_family("output", "daddr", lan_sets, f"{svc.transport} dport {svc.port} accept",
                         f"lan out: {svc.role} {svc.port}/{svc.transport}")
        if svc.transport == "udp" and svc.inbound and svc.outbound:
            # A reply to a probe sent to a broadcast address matches no conntrack entry
            # (the probe's destination was the broadcast): allow it by its source port.
            # Only to an unprivileged port (a probe comes from one; a forged probe must not
            # turn the box into a reflector onto LAN services) and only datagram-sized.
            b.per_family("output", "daddr", lan_sets,
                         f"udp sport {svc.port} udp dport 1024-65535 udp length <= {_DISCOVERY_UDP_LENGTH} accept",
                         f"lan out: {svc.role} replies from {svc.port}/udp")
            b.rule("output", f"ip daddr 255.255.255.255 udp dport {svc.port} udp length <= "
                   f"{_DISCOVERY_UDP_LENGTH} accept", f"lan out: {svc.role} broadcast {svc.port}/udp")
    for dev in policy.devices:
        _port_ok(dev.port, f"devices.{dev.name}.port")
        nets = _networks([dev.address], f"devices.{dev.name}.address")
        family: Family = "ip" if nets["ip"] else "ip6"
        b.rule("output", f"{family} daddr {nets[family][0]} tcp dport {dev.port} accept",
               f"lan out: device {dev.name} {dev.port}/tcp")
    b.rule("output", 'limit rate 5/minute log prefix "appliance drop out: " level info', "log dropped out")
    b.rule("output", 'counter name "dropped_out" drop', "drop out")

    b.rule("forward", 'counter name "dropped_forward" drop', "drop forward")

    chains = tuple(Chain(name=name, hook=f"type filter hook {name} priority filter", policy="drop",
                         rules=tuple(rules)) for name, rules in b.rules.items())
    return Ruleset(counters=COUNTERS, sets=dict(b.sets), chains=chains, dynamic_sets=dict(b.dynamic_sets))


def _proxy_rules(b: _Builder, proxy: FirewallProxy, lan_sets: Mapping[Family, str | None]) -> None:
    _port_ok(proxy.port, "wan.proxy")
    comment = f"wan out: proxy {proxy.host}:{proxy.port}"
    try:
        address = ipaddress.ip_address(proxy.host.strip("[]"))
    except ValueError:
        # A name: nft needs addresses, and resolving here would freeze whatever DNS said
        # at render time. A shop's proxy is on its LAN: allow the proxy port to the LAN.
        b.per_family("output", "daddr", lan_sets, f"tcp dport {proxy.port} accept", comment)
        return
    family = "ip" if address.version == 4 else "ip6"
    b.rule("output", f"{family} daddr {address} tcp dport {proxy.port} accept", comment)


def format_ruleset(ruleset: Ruleset, *, header: Sequence[str] = ()) -> str:
    """The file for ``nft -f``: creates or replaces the table atomically, nothing else."""
    out = ["#!/usr/sbin/nft -f", *(f"# {line}".rstrip() for line in header),
           f"table inet {TABLE}", f"delete table inet {TABLE}", "", f"table inet {TABLE} {{"]
    blocks: list[list[str]] = []
    for name in ruleset.counters:
        blocks.append([f"\tcounter {name} {{", "\t}"])
    for name, (type_, elements) in ruleset.sets.items():
        blocks.append([f"\tset {name} {{", f"\t\ttype {type_}", "\t\tflags interval",
                       f"\t\telements = {{ {', '.join(elements)} }}", "\t}"])
    for name, type_ in ruleset.dynamic_sets.items():
        blocks.append([f"\tset {name} {{", f"\t\ttype {type_}", f"\t\tsize {_DYNAMIC_SET_SIZE}",
                       "\t\tflags dynamic", "\t}"])
    for chain in ruleset.chains:
        blocks.append([f"\tchain {chain.name} {{", f"\t\t{chain.hook}; policy {chain.policy};",
                       *(f"\t\t{rule.line()}" for rule in chain.rules), "\t}"])
    for i, block in enumerate(blocks):
        if i:
            out.append("")
        out.extend(block)
    out.append("}")
    return "\n".join(out) + "\n"


def render(policy: Policy, *, header: Sequence[str] = ()) -> str:
    """``policy`` as the text of an nftables file (pure: no I/O, no clock)."""
    return format_ruleset(build(policy), header=header)

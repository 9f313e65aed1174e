"""The firewall renderer, parser and comparison; `appliance firewall render|check`.

nft itself checks every rendered ruleset (``unshare -rn nft -c -f``, no root needed), and
a ruleset loaded into a private network namespace is listed back and compared.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.config import PORT_ROLES, ConfigError, Ports, parse_config
from appliance.health.firewall import (
    Loaded,
    differences,
    firewall_check,
    firewall_checks,
    policy_from_config,
    render_config,
)
from appliance.protocol.firewall import FirewallError, Policy, Service, build, format_ruleset, render
from appliance.protocol.firewall_compare import RulesetParseError, compare, counter_values, parse
from appliance.protocol.health import Status

NFT = shutil.which("nft") or ("/usr/sbin/nft" if os.path.exists("/usr/sbin/nft") else None)
UNSHARE = shutil.which("unshare")


def _can_unshare() -> bool:
    if NFT is None or UNSHARE is None:
        return False
    return subprocess.run([UNSHARE, "-rn", "true"], capture_output=True, check=False).returncode == 0


needs_nft = pytest.mark.skipif(not _can_unshare(), reason="nft or unprivileged network namespaces unavailable "
                                                        "(scripts/setup --test installs nftables)")


def nft_check(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "rules.nft"
    path.write_text(text)
    assert NFT and UNSHARE
    return subprocess.run([UNSHARE, "-rn", NFT, "-c", "-f", str(path)], capture_output=True, text=True, check=False)


def load_and_list(text: str, tmp_path: Path, extra: str = "") -> str:
    """Load ``text`` into a fresh network namespace, then ``extra`` commands, and list the table."""
    path, more = tmp_path / "load.nft", tmp_path / "more.nft"
    path.write_text(text)
    more.write_text(extra)
    assert NFT and UNSHARE
    proc = subprocess.run([UNSHARE, "-rn", "sh", "-c",
                           f'{NFT} -f "$1" && {NFT} -f "$2" && {NFT} list table inet appliance',
                           "sh", str(path), str(more)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True, check=False,
                          env={**os.environ, "APPLIANCE_CONFIG": "", **(env or {})})


CONFIGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "proxy by address": {"wan": {"proxy": "http://192.168.1.2:3128"}},
    "proxy by name": {"wan": {"proxy": "http://proxy.shop.lan:8080"}},
    "ipv6 proxy": {"wan": {"proxy": "http://[fd00::2]:3128"}},
    "servers": {"wan": {"dns_servers": ["192.168.1.1", "fd00::1"], "ntp_servers": ["192.168.1.1"]}},
    "ipv4 lan only, overlapping": {"lan": {"prefixes": ["10.0.0.0/8", "10.1.0.0/16", "192.168.1.7"]}},
    "moved ports": {"lan": {"ports": {"admin": 8080, "api": 9000, "discovery": 40000, "device": 9100}}},
    "declared device": {"devices": [{"id": "printer", "kind": "printer", "address": "192.168.1.50", "port": 9100}]},
}


@needs_nft
@pytest.mark.parametrize("name", list(CONFIGS))
def test_nft_accepts_the_rendered_ruleset(name: str, tmp_path: Path) -> None:
    text = render_config(parse_config(CONFIGS[name]), name)
    proc = nft_check(text, tmp_path)
    assert proc.returncode == 0, f"{name}: {proc.stderr}"


@needs_nft
def test_nft_refuses_a_broken_ruleset(tmp_path: Path) -> None:
    # The check above can fail: the same command rejects a damaged rendering.
    text = render_config(parse_config({}), "x").replace("policy drop;", "policy maybe;")
    assert nft_check(text, tmp_path).returncode != 0


@needs_nft
@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_loaded_ruleset_compares_equal_to_its_rendering(name: str, tmp_path: Path) -> None:
    config = parse_config(CONFIGS[name])
    listed = load_and_list(render_config(config, name), tmp_path)
    assert differences(config, Loaded(text=listed)) == []


@needs_nft
def test_loading_twice_replaces_the_table(tmp_path: Path) -> None:
    text = render_config(parse_config({}), "x")
    listed = load_and_list(text + text.replace("#!/usr/sbin/nft -f", ""), tmp_path)
    assert differences(parse_config({}), Loaded(text=listed)) == []
    assert listed.count("chain input {") == 1


@needs_nft
def test_changes_to_the_loaded_table_are_said_in_words(tmp_path: Path) -> None:
    config = parse_config({})
    listed = load_and_list(render_config(config, "x"), tmp_path, extra="\n".join([
        "",
        "add rule inet appliance input tcp dport 22 accept",
        "delete element inet appliance lan_v4 { 10.0.0.0/8 }",
        "add element inet appliance lan_v4 { 203.0.113.0/24 }",
        "chain inet appliance output { policy accept; }",
        "",
    ]))
    diffs = differences(config, Loaded(text=listed))
    assert "chain input: unexpected rule 'tcp dport 22 accept'" in diffs
    assert "set lan_v4 lacks 10.0.0.0/8" in diffs
    assert "set lan_v4 also holds 203.0.113.0/24" in diffs
    assert "chain output has policy accept, expected drop" in diffs
    assert len(diffs) == 4


def test_ports_come_from_the_port_map() -> None:
    moved = parse_config(CONFIGS["moved ports"])
    text = render_config(moved, "x")
    for port in (8080, 9000, 40000, 9100):
        assert f"dport {port} " in text
    for old in (80, 8000, 57854, 8081):
        assert f"dport {old} " not in text
    # Every role of the map appears in its direction; port 0 ("any free port") opens nothing.
    policy = policy_from_config(parse_config({"lan": {"ports": {"support": 0}}}))
    assert {s.role for s in policy.services} == {r.role for r in PORT_ROLES} - {"support"}
    assert "support" not in render(policy)


def test_default_rules_match_the_seed() -> None:
    ruleset = build(policy_from_config(parse_config({})))
    inbound = {r.comment for r in ruleset.chains[0].rules}
    outbound = {r.comment for r in ruleset.chains[1].rules}
    for port in (80, 8000, 8001, 8002, 8003, 8004, 8005):
        assert any(c.startswith("lan in:") and f" {port}/tcp" in c for c in inbound), port
    assert "lan in: discovery 57854/udp" in inbound
    assert {"wan out: https 443/tcp", "lan out: device 8081/tcp", "lan out: discovery 57854/udp",
            "wan out: dns 53/udp", "wan out: ntp 123/udp"} <= outbound
    assert [c.policy for c in ruleset.chains] == ["drop", "drop", "drop"]
    assert set(ruleset.counters) == {"dropped_in", "dropped_out", "dropped_forward"}


def test_a_proxy_replaces_direct_https() -> None:
    by_ip = render_config(parse_config(CONFIGS["proxy by address"]), "x")
    assert "tcp dport 443 " not in by_ip
    assert "ip daddr 192.168.1.2 tcp dport 3128 accept" in by_ip
    by_name = render_config(parse_config(CONFIGS["proxy by name"]), "x")
    assert "ip daddr @lan_v4 tcp dport 8080 accept" in by_name
    assert "tcp dport 443 " not in by_name
    default_port = policy_from_config(parse_config({"wan": {"proxy": "http://192.168.1.2"}}))
    assert default_port.proxy is not None and default_port.proxy.port == 80


def test_servers_restrict_dns_and_ntp() -> None:
    text = render_config(parse_config(CONFIGS["servers"]), "x")
    assert "ip daddr @dns_v4 udp dport 53 accept" in text
    assert "ip6 daddr @dns_v6 tcp dport 53 accept" in text
    assert "ip daddr @ntp_v4 udp dport 123 accept" in text
    assert "\t\tudp dport 53 accept" not in text


@pytest.mark.parametrize(("policy", "message"), [
    (Policy(services=(), lan_prefixes=()), "lan.prefixes is empty"),
    (Policy(services=(), lan_prefixes=("not-a-net",)), "not an IP address or network: 'not-a-net'"),
    (Policy(services=(Service(role="api", transport="tcp", port=70000, inbound=True, outbound=False),),
            lan_prefixes=("10.0.0.0/8",)), "lan.ports.api: port must be between 1 and 65535"),
])
def test_policies_that_cannot_be_rendered(policy: Policy, message: str) -> None:
    with pytest.raises(FirewallError, match=message):
        build(policy)


def test_a_proxy_url_without_a_port_or_host_is_refused() -> None:
    with pytest.raises(FirewallError, match="no host"):
        policy_from_config(parse_config({"wan": {"proxy": "http://:3128"}}))
    with pytest.raises(FirewallError, match="cannot read the proxy's port"):
        policy_from_config(parse_config({"wan": {"proxy": "http://proxy:99999"}}))


# --- the parser ------------------------------------------------------------------------

@given(st.text(max_size=400))
def test_any_text_parses_or_raises_the_parse_error(text: str) -> None:
    with contextlib.suppress(RulesetParseError):
        parse(text)


@given(st.lists(st.sampled_from(["table inet appliance {", "}", "chain input {", "set s {", "counter c {",
                                 "elements = { 1.2.3.4,", "5.6.7.8 }", "type filter hook input priority 0; "
                                 "policy drop;", 'tcp dport 1 accept comment "x"', "flags dormant", ""]),
                max_size=30))
def test_any_arrangement_of_listing_lines_parses_or_raises(lines: list[str]) -> None:
    with contextlib.suppress(RulesetParseError):
        parse("\n".join(lines))


def test_parse_errors_are_clear() -> None:
    with pytest.raises(RulesetParseError, match="no 'table inet appliance"):
        parse("table ip other {\n}\n")
    with pytest.raises(RulesetParseError, match="chain input is not closed"):
        parse("table inet appliance {\n\tchain input {\n\t\taccept\n")
    with pytest.raises(RulesetParseError, match="longer than"):
        parse("x" * 20_000)


_nets = st.one_of(
    st.builds(lambda a, p: f"10.{a}.0.0/{p}", st.integers(0, 255), st.integers(8, 16)),
    st.builds(lambda a: f"fd{a:02x}::/16", st.integers(0, 255)),
    st.builds(lambda a: f"192.168.{a}.9", st.integers(0, 255)),
)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(ports=st.lists(st.integers(1, 65535), min_size=len(PORT_ROLES), max_size=len(PORT_ROLES), unique=True),
       prefixes=st.lists(_nets, min_size=1, max_size=6),
       dns=st.lists(st.sampled_from(["192.168.1.1", "fd00::53", "10.0.0.53"]), max_size=3, unique=True))
def test_render_then_parse_round_trips(ports: list[int], prefixes: list[str], dns: list[str]) -> None:
    roles = [r.role for r in PORT_ROLES]
    config = parse_config({"lan": {"ports": dict(zip(roles, ports, strict=True)), "prefixes": prefixes},
                           "wan": {"dns_servers": dns}})
    policy = policy_from_config(config)
    assert compare(build(policy), parse(render(policy))) == []


def test_counter_values_are_read_from_a_listing() -> None:
    listing = "table inet appliance {\n\tcounter dropped_in {\n\t\tpackets 7 bytes 420\n\t}\n}\n"
    assert counter_values(listing) == {"dropped_in": (7, 420)}


def test_missing_pieces_are_named() -> None:
    full = build(policy_from_config(parse_config({})))
    bare = parse(format_ruleset(type(full)(counters=(), sets={}, chains=full.chains[:1])))
    diffs = compare(full, bare)
    assert "counter dropped_in is missing" in diffs
    assert any(d.startswith("set lan_v4 is missing") for d in diffs)
    assert "chain output is missing: nothing filters output traffic" in diffs


# --- the commands ----------------------------------------------------------------------

def test_render_command_writes_the_file(tmp_path: Path) -> None:
    conf = tmp_path / "appliance.toml"
    conf.write_text('[wan]\nproxy = "http://192.168.1.2:3128"\n')
    out = tmp_path / "appliance.nft"
    proc = cli("firewall", "render", "--config", str(conf), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "ip daddr 192.168.1.2 tcp dport 3128 accept" in out.read_text()
    assert str(conf) in out.read_text()
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_render_command_refuses_a_bad_config_and_keeps_the_old_file(tmp_path: Path) -> None:
    out = tmp_path / "appliance.nft"
    out.write_text("previous\n")
    for body, words in [('[lan]\nprefixes = ["nope"]\n', "not an IP network"),
                        ('[wan]\nproxy = "http://proxy:99999"\n', "cannot render the firewall")]:
        conf = tmp_path / "bad.toml"
        conf.write_text(body)
        proc = cli("firewall", "render", "--config", str(conf), "--out", str(out))
        assert proc.returncode == 2
        assert words in proc.stderr
        assert out.read_text() == "previous\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["appliance.nft", "bad.toml"]


@needs_nft
def test_check_command_exit_codes(tmp_path: Path) -> None:
    same = tmp_path / "same.nft"
    same.write_text(load_and_list(render_config(parse_config({}), "x"), tmp_path))
    proc = cli("firewall", "check", "--loaded", str(same))
    assert (proc.returncode, proc.stdout.strip()) == (0, "the loaded firewall matches the one rendered from the "
                                                         "port map")
    moved = tmp_path / "moved.toml"
    moved.write_text("[lan.ports]\napi = 9000\n")
    proc = cli("firewall", "check", "--loaded", str(same), "--config", str(moved))
    assert proc.returncode == 1
    assert "rule 'lan in: api 9000/tcp' is missing" in proc.stdout
    assert "unexpected rule 'ip saddr @lan_v4 tcp dport 8000 accept' (comment 'lan in: api 8000/tcp')" in proc.stdout
    proc = cli("firewall", "check", "--loaded", str(tmp_path / "absent.nft"))
    assert proc.returncode == 2 and "cannot read the firewall" in proc.stderr
    garbage = tmp_path / "garbage.nft"
    garbage.write_text("this is not nft\n")
    proc = cli("firewall", "check", "--loaded", str(garbage))
    assert proc.returncode == 2 and "no 'table inet appliance" in proc.stderr


def test_check_command_without_nft_says_how_to_fix(tmp_path: Path) -> None:
    proc = cli("firewall", "check", env={"PATH": str(tmp_path)})
    assert proc.returncode == 2
    assert "cannot read the firewall: the nft program is not installed" in proc.stderr
    assert "fix: install the nftables package" in proc.stderr


def test_check_command_with_a_bad_config(tmp_path: Path) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text("[lan]\nprefixes = 3\n")
    proc = cli("firewall", "check", "--config", str(conf))
    assert proc.returncode == 2 and "config error: lan.prefixes" in proc.stderr


# --- the health check ------------------------------------------------------------------

def test_the_check_is_registered_only_where_the_ruleset_is_installed(tmp_path: Path) -> None:
    config = parse_config({})
    assert firewall_check(config, tmp_path / "appliance.nft") is None
    (tmp_path / "appliance.nft").write_text("x")
    assert firewall_check(config, tmp_path / "appliance.nft") is not None


def _fake_nft(bin_dir: Path, stdout: str, stderr: str, code: int) -> None:
    # A stand-in for nft answering like the real one does for an unprivileged user.
    bin_dir.mkdir()
    (bin_dir / "out").write_text(stdout)
    (bin_dir / "err").write_text(stderr)
    script = bin_dir / "nft"
    script.write_text(f'#!/bin/sh\n/bin/cat "{bin_dir}/out"; /bin/cat "{bin_dir}/err" >&2; exit {code}\n')
    script.chmod(0o755)


@needs_nft
async def test_health_check_reads_the_saved_copy_without_cap_net_admin(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config({})
    listing = load_and_list(render_config(config, "x"), tmp_path)
    _fake_nft(tmp_path / "bin", "", "Error: Could not process rule: Operation not permitted\n", 1)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    snapshot = tmp_path / "loaded.nft"
    [check] = await firewall_checks(config, snapshot=snapshot)
    assert check.status == Status.WARN
    assert check.message == "cannot read the firewall: reading the ruleset needs CAP_NET_ADMIN"
    assert "sudo appliance firewall check" in check.fix
    snapshot.write_text(listing)
    [check] = await firewall_checks(config, snapshot=snapshot)
    assert (check.status, check.message) == (Status.OK, "the loaded firewall matches the port map (as loaded at boot)")
    snapshot.write_text(listing.replace("dport 8004 ", "dport 8014 "))
    [check] = await firewall_checks(config, snapshot=snapshot)
    assert check.status == Status.WARN and "lan in: ops 8004/tcp" in check.message


async def test_health_check_live_listing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config({})
    text = render_config(config, "x")
    listing = text.replace("counter dropped_in {\n", "counter dropped_in {\n\t\tpackets 3 bytes 180\n")
    _fake_nft(tmp_path / "bin", listing, "", 0)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    [check] = await firewall_checks(config)
    assert check.status == Status.OK
    assert check.data["dropped"] == {"dropped_in": 3}
    absent = tmp_path / "bin2"
    _fake_nft(absent, "", "Error: No such file or directory\n", 1)
    monkeypatch.setenv("PATH", str(absent))
    [check] = await firewall_checks(config)
    assert check.status == Status.FAIL and "not loaded" in check.message


def test_ports_validation_still_guards_the_renderer() -> None:
    # The config refuses what the renderer could not use (a duplicate listener port).
    with pytest.raises(ConfigError):
        parse_config({"lan": {"ports": {"admin": 8000}}})
    assert Ports().admin == 80


def test_one_address_is_limited_across_the_listeners() -> None:
    ruleset = build(policy_from_config(parse_config({"http": {"max_connections_per_source": 10}})))
    rule = next(r for r in ruleset.chains[0].rules if r.comment == "lan in: over 70 connections from one address")
    assert rule.text == ('ip saddr @lan_v4 tcp dport { 80, 8000, 8001, 8002, 8003, 8004, 8005 } ct state new '
                         'add @per_source_v4 { ip saddr ct count over 70 } counter name "dropped_in" drop')
    assert ruleset.dynamic_sets == {"per_source_v4": "ipv4_addr", "per_source_v6": "ipv6_addr"}
    comments = [r.comment for r in ruleset.chains[0].rules]
    assert comments.index("lan in: over 70 connections from one address") < comments.index("lan in: api 8000/tcp")


def test_discovery_replies_are_datagram_sized_and_to_unprivileged_ports() -> None:
    text = render_config(parse_config({}), "x")
    assert "ip daddr @lan_v4 udp sport 57854 udp dport 1024-65535 udp length <= 1208 accept" in text
    assert "ip daddr 255.255.255.255 udp dport 57854 udp length <= 1208 accept" in text


def test_dns_and_ntp_go_to_the_servers_dhcp_gave(tmp_path: Path) -> None:
    (tmp_path / "2").write_text("# This is private data. Do not parse.\nADDRESS=192.168.1.20\n"
                                "DNS=192.168.1.1 2001:db8::53\nNTP=192.168.1.1 ntp.example.org\n")
    policy = policy_from_config(parse_config({}), leases=tmp_path)
    assert policy.dns_servers == ("192.168.1.1", "2001:db8::53") and policy.ntp_servers == ("192.168.1.1",)
    configured = policy_from_config(parse_config({"wan": {"dns_servers": ["10.0.0.53"]}}), leases=tmp_path)
    assert configured.dns_servers == ("10.0.0.53",)  # the configuration wins
    text = render(policy)
    assert "ip daddr @dns_v4 udp dport 53 accept" in text and "ip6 daddr @dns_v6 tcp dport 53 accept" in text
    assert "\t\tudp dport 53 accept" not in text and "\t\tudp dport 123 accept" not in text
    nothing = policy_from_config(parse_config({}), leases=tmp_path / "none")
    assert nothing.dns_servers == () and nothing.ntp_servers == ()  # no lease yet: DNS and NTP anywhere


def test_a_loaded_connection_counter_set_with_elements_compares_equal(tmp_path: Path) -> None:
    expected = build(policy_from_config(parse_config({})))
    listing = format_ruleset(expected).replace(
        "\t\tflags dynamic\n", "\t\tflags dynamic\n\t\telements = { 192.168.1.7 ct count over 224 }\n", 1)
    assert compare(expected, parse(listing)) == []
    missing = format_ruleset(attrs.evolve(expected, dynamic_sets={}))
    assert "set per_source_v4 is missing (it counts connections per address)" in compare(expected, parse(missing))

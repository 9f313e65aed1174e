"""Configuration: defaults, strict types, path-named errors, file discovery, masking."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.config import (
    LISTENER_ROLES,
    PORT_ROLES,
    Config,
    ConfigError,
    Ports,
    find_config_path,
    load_config,
    parse_config,
    to_toml_dict,
)


def errors_of(data: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.errors


def test_defaults_match_the_seed_port_map() -> None:
    ports = Config().lan.ports.as_dict()
    assert ports == {"admin": 80, "api": 8000, "events": 8001, "media": 8002, "provisioning": 8003,
                     "ops": 8004, "support": 8005, "discovery": 57854, "device": 8081}
    assert [r.role for r in PORT_ROLES] == list(ports)
    assert LISTENER_ROLES == ("admin", "api", "events", "media", "provisioning", "ops", "support")


def test_empty_file_is_the_defaults() -> None:
    assert parse_config({}) == Config()


def test_unknown_key_is_named_with_its_path() -> None:
    assert errors_of({"http": {"graceful_timout": 3}}) == ["http: unknown key(s) graceful_timout"]
    assert errors_of({"bogus": 1}) == ["(top level): unknown key(s) bogus"]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"lan": {"ports": {"api": "8000"}}}, "lan.ports.api: expected int, got str"),
        ({"lan": {"ports": {"api": True}}}, "lan.ports.api: expected int, got bool"),
        ({"discovery": {"enabled": "false"}}, "discovery.enabled: expected bool, got str"),
        ({"discovery": {"enabled": 0}}, "discovery.enabled: expected bool, got int"),
        ({"storage": {"dir": 42}}, "storage.dir: expected str, got int"),
        ({"supervisor": {"shutdown_deadline_s": "10"}},
         "supervisor.shutdown_deadline_s: expected int or float, got str"),
    ],
)
def test_scalar_types_are_strict(data: dict[str, object], expected: str) -> None:
    assert errors_of(data) == [expected]


def test_bad_port_values() -> None:
    assert errors_of({"lan": {"ports": {"ops": 70000}}}) == [
        "lan.ports.ops: port must be between 0 and 65535, got 70000"]
    assert errors_of({"lan": {"ports": {"api": 80}}}) == ["lan.ports: port 80 is given to both admin and api"]


def test_every_error_is_reported_at_once() -> None:
    # One problem per section at least: a technician fixes the file in one go, not one
    # line per run. (Within one table, type errors are found before value checks run.)
    errors = errors_of({"lan": {"ports": {"api": "x"}}, "log": {"level": "loud"}, "http": {"x": 1}})
    assert sorted(errors) == sorted([
        "lan.ports.api: expected int, got str",
        "log.level: must be one of debug, info, warning, error; got 'loud'",
        "http: unknown key(s) x",
    ])


def test_devices_list_errors_name_the_index() -> None:
    errors = errors_of({"devices": [{"id": "p1", "kind": "printer", "address": "10.0.0.5"},
                                    {"id": "p2", "kind": "printer", "address": "not-an-ip"}]})
    assert errors == ["devices[1].address: not an IP address: 'not-an-ip'"]


def test_tls_cannot_be_switched_off() -> None:
    assert errors_of({"cloud": {"api_url": "http://api.example"}}) == [
        "cloud.api_url: must be an https:// URL (TLS cannot be switched off), got 'http://api.example'"]


def test_port_offset_moves_listeners_only() -> None:
    moved = Ports().with_offset(10000)
    assert moved.admin == 10080 and moved.support == 18005
    assert moved.discovery == 57854 and moved.device == 8081
    with pytest.raises(ConfigError, match="past 65535"):
        Ports().with_offset(60000)


@given(st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=5), st.booleans()), max_size=4))
def test_any_mapping_parses_or_raises_config_error(data: dict[str, object]) -> None:
    try:
        parse_config({"lan": {"ports": data}})
    except ConfigError as exc:
        assert exc.errors and all(": " in line for line in exc.errors)


def test_config_file_lookup_order(tmp_path: Path) -> None:
    explicit = tmp_path / "a.toml"
    from_env = tmp_path / "b.toml"
    assert find_config_path(str(explicit), {"APPLIANCE_CONFIG": str(from_env)}) == explicit
    assert find_config_path(None, {"APPLIANCE_CONFIG": str(from_env)}) == from_env


def test_load_reports_bad_toml_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[lan\nbind = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {})
    assert str(path) in info.value.errors[0] and "not valid TOML" in info.value.errors[0]
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.toml"), {})


def test_secrets_are_masked() -> None:
    shown = to_toml_dict(parse_config({"admin": {"token": "s3cret-s3cret-s3cret-s3cret"}, "orders": {"sas_key": "k"}}))
    assert shown["admin"]["token"] == "***"
    assert shown["orders"]["sas_key"] == "***"
    assert "s3cret" not in json.dumps(shown)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True,
                          timeout=60, env=env, check=False)


def test_config_check_command(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[lan.ports]\napi = 9000\n')
    ok = run_cli("config", "check", "--config", str(good))
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[lan]\n[lan]\n')
    result = run_cli("config", "check", "--config", str(bad))
    assert result.returncode == 2
    assert "not valid TOML" in result.stderr  # a table declared twice
    bad.write_text('[lan.ports]\napi = "9000"\nfoo = 1\n')
    result = run_cli("config", "check", "--config", str(bad))
    assert result.returncode == 2
    assert "lan.ports.api: expected int, got str" in result.stderr
    assert "lan.ports: unknown key(s) foo" in result.stderr


def test_ports_and_show_commands(tmp_path: Path) -> None:
    result = run_cli("ports", "--json", "--config", str(tmp_path / "none.toml"))
    assert result.returncode == 2  # a named file that does not exist is an error, not the defaults
    cfg = tmp_path / "c.toml"
    cfg.write_text('[admin]\ntoken = "abcdefghijklmnopqrstuvwxyz"\n')
    rows = json.loads(run_cli("ports", "--json", "--config", str(cfg)).stdout)
    assert {r["role"]: r["port"] for r in rows}["discovery"] == 57854
    shown = run_cli("config", "show", "--config", str(cfg))
    assert shown.returncode == 0 and "abcdefgh" not in shown.stdout and '"***"' in shown.stdout


def test_a_partial_service_bus_table_keeps_its_own_defaults() -> None:
    """Writing [orders] or [support] must not swap in the other section's defaults."""
    config = parse_config({"orders": {"max_wait_s": 2.0}, "support": {"enabled": True}})
    assert config.orders.enabled is True
    assert config.orders.namespace == "e-serversync-ns.servicebus.windows.net"
    assert config.support.namespace == "koostodesapp-ns.servicebus.windows.net"
    assert Config().support.enabled is False

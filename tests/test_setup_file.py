"""The boot partition's setup file: parsing with path-named errors, scrubbing the secrets,
the TOML writer, and day one against the real processes (``appliance setup apply``, then
``appliance run``): a box that reaches the platform only through an authenticating proxy
and pairs itself; a broken file that changes nothing and says what is wrong; a release."""

from __future__ import annotations

import html
import json
import os
import shutil
import sys
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from appliance.config import SETTINGS_FILE, ConfigError
from appliance.protocol.tomlwrite import dumps
from appliance.setupfile import HANDOFF_FILE, SETUP_FILE, STATUS_FILE, effective, merge, parse_setup, scrub
from appliance.storage.owner import OWNER_FILE
from appliance.storage.pairing import PAIRING_FILE
from tests.proxy import run_tinyproxy
from tests.realbox import box_config, real_box
from tests.sync_helpers import StartSim, free_port, wait_until

pytest_plugins = ["tests.sync_fixtures"]

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "image" / "files" / "boot" / "firmware" / SETUP_FILE


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_setup(text)
    return caught.value.errors


def test_the_shipped_example_is_valid_and_sets_nothing() -> None:
    setup = parse_setup(EXAMPLE.read_text("utf-8"))
    assert setup.network is None and setup.proxy is None and not setup.pairing.code
    # Every commented line, uncommented, is a valid setting too.
    lines = [ln[2:] if ln.startswith("# ") and "=" in ln and not ln.startswith("# appliance") else ln
             for ln in EXAMPLE.read_text("utf-8").splitlines()]
    lines = [ln[2:] if ln.startswith("# [") else ln for ln in lines]
    text = "\n".join(ln for ln in lines if not ln.startswith("release"))
    full = parse_setup(text)
    assert full.network is not None and full.network.mode == "static" and full.proxy is not None
    assert full.pairing.code == "PAIR-1234" and full.box.language == "fr"


def test_errors_name_their_path_and_never_echo_a_password() -> None:
    assert errors_of('[box]\nlanguage = "de"\n[network]\nmode = "statik"\n[proxy]\npasword = "x"\nurl = "http://p:1"') \
        == ["box.language: must be one of en, fr; got 'de'",
            "network.mode: must be one of dhcp, static; got 'statik'",
            "proxy: unknown key(s) pasword"]
    leaked = errors_of('[proxy]\nurl = "http://shop:hunter2@10.0.0.1:3128"\n')
    assert leaked == ["proxy.url: put the user name and password in user and password, not in the URL"]
    assert errors_of('[network]\nmode = "static"\naddress = "10.0.0.5/24"\n') == [
        'network.gateway: required when mode is "static" (the shop\'s router)']
    assert errors_of("[network]\ndns = [\"10.0.0.300\"]\n") == ["network.dns: not an IP address: '10.0.0.300'"]
    assert errors_of("[pairing]\nrelease = \"yes\"\n") == ["pairing.release: expected bool, got str"]
    assert errors_of("[box\n")[0].startswith("not valid TOML")


def test_addresses_are_checked_as_the_configuration_checks_them() -> None:
    assert errors_of('[network]\nmode = "static"\naddress = "10.0.0.5/24"\ngateway = "10.0.1.1"\n') == [
        "network.gateway: 10.0.1.1 is not in the box's network 10.0.0.0/24"]
    # A setting the merged configuration refuses is named by the setup file's path.
    with pytest.raises(ConfigError) as caught:
        effective({}, {"wan": {"dns_servers": ["x"]}, "lan": {"prefixes": ["y"]}})
    assert caught.value.errors == ["once merged into the configuration: lan.prefixes: not an IP network: 'y'",
                                   "network.dns: not an IP address: 'x'"]


def test_a_scrubbed_file_keeps_the_proxy_password_the_box_has() -> None:
    before = parse_setup('[proxy]\nurl = "http://10.0.0.1:3128"\nuser = "shop"\npassword = "p@ss:w/rd"\n')
    first = merge({}, before, current_proxy="", ca_path="/ca.pem")
    assert first["wan"]["proxy"] == "http://shop:p%40ss%3Aw%2Frd@10.0.0.1:3128"
    after = parse_setup('[proxy]\nurl = "http://10.0.0.1:3128"\nuser = "shop"\n')
    assert merge(first, after, current_proxy=first["wan"]["proxy"], ca_path="/ca.pem") == first
    other = parse_setup('[proxy]\nurl = "http://10.0.0.2:3128"\nuser = "shop"\n')
    assert merge(first, other, current_proxy=first["wan"]["proxy"], ca_path="/ca.pem")["wan"]["proxy"] \
        == "http://shop@10.0.0.2:3128"


_keys = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
_scalars = st.one_of(st.text(max_size=20), st.integers(), st.booleans(),
                     st.floats(allow_nan=False), st.lists(st.text(max_size=5), max_size=3))
_tables = st.dictionaries(_keys, _scalars, max_size=4)


@given(st.dictionaries(_keys, st.one_of(_scalars, _tables, st.lists(_tables, min_size=1, max_size=2)), max_size=5))
def test_the_toml_writer_round_trips(data: dict[str, Any]) -> None:
    assert tomllib.loads(dumps(data)) == data


@given(code=st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=30),
       password=st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=30),
       comment=st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=30),
       crlf=st.booleans())
def test_scrubbing_removes_only_the_secrets(code: str, password: str, comment: str, crlf: bool) -> None:
    data = {"box": {"name": "x"}, "proxy": {"url": "http://10.0.0.1:3128", "user": "u", "password": password},
            "pairing": {"code": code, "release": True}}
    text = f"# {comment}\n" + dumps(data)
    if crlf:
        text = text.replace("\n", "\r\n")
    new, removed = scrub(text, when="today")
    assert sorted(removed) == ["pairing.code", "pairing.release", "proxy.password"]
    assert tomllib.loads(new) == {"box": {"name": "x"}, "proxy": {"url": "http://10.0.0.1:3128", "user": "u"},
                                  "pairing": {}}
    assert new.startswith(f"# {comment}")
    assert not [ln for ln in new.splitlines() if ln.split("=")[0].strip() in ("code", "password", "release")]
    assert len(new.splitlines()) == len(text.splitlines())  # line for line: the comments stay where they were


# --- against the real processes ----------------------------------------------------------


async def setup_apply(config: Path, boot: Path, network: Path) -> tuple[int, str, str]:
    with trio.fail_after(60):
        done = await trio.run_process([sys.executable, "-m", "appliance", "setup", "apply", "--config", str(config),
                                       "--boot-dir", str(boot), "--network-dir", str(network)],
                                      capture_stdout=True, capture_stderr=True, check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def health(ops_port: int) -> dict[str, dict[str, Any]]:
    async with httpx.AsyncClient(timeout=30) as client:
        report = (await client.get(f"http://127.0.0.1:{ops_port}/health")).json()
    return {c["name"]: c for c in report["checks"]}


async def test_day_one_through_a_proxy_with_the_setup_file(start_sim: StartSim, nursery: trio.Nursery,
                                                           tmp_path: Path) -> None:
    sim = await start_sim()
    proxy = await nursery.start(lambda task_status: run_tinyproxy(tmp_path / "proxy", basic_auth=("shop", "s3c-r3t"),
                                                                  task_status=task_status))
    admin, ops = free_port(), free_port()
    # The box trusts the simulator only through the proxy's CA given in the setup file.
    config = box_config(tmp_path, sim.url, None, admin, ops)
    boot, network, state = tmp_path / "boot", tmp_path / "network", tmp_path / "state"
    boot.mkdir()
    shutil.copy(sim.ca_path, boot / "proxy-ca.pem")
    text = (f"# Boulangerie Martin\n[box]\nname = \"Boulangerie Martin\"\nlanguage = \"fr\"\n\n"
            f"[network]\nmode = \"static\"\naddress = \"192.168.50.10/24\"\ngateway = \"192.168.50.1\"\n"
            f"dns = [\"192.168.50.1\"]\n\n"
            f"[proxy]\nurl = \"{proxy.url}\"\nuser = \"shop\"\npassword = \"s3c-r3t\"  # from IT\n"
            f"ca_file = \"proxy-ca.pem\"\n\n[pairing]\ncode = \"{sim.pair_code}\"\n")
    (boot / SETUP_FILE).write_text(text.replace("\n", "\r\n"))  # written on Windows
    code, out, err = await setup_apply(config, boot, network)
    assert code == 0, err
    assert "applied" in out and "static address 192.168.50.10/24 via 192.168.50.1" in out
    scrubbed = (boot / SETUP_FILE).read_bytes().decode()
    assert "s3c-r3t" not in scrubbed and sim.pair_code not in scrubbed
    assert "# Boulangerie Martin\r\n" in scrubbed and 'user = "shop"\r\n' in scrubbed
    assert "then removed from this file" in scrubbed
    unit = (network / "10-appliance-setup.network").read_text()
    assert "Address=192.168.50.10/24\nGateway=192.168.50.1\nDNS=192.168.50.1\n" in unit
    assert os.stat(state / SETTINGS_FILE).st_mode & 0o777 == 0o600
    async with real_box(config, admin, tmp_path / "box.log") as box:
        # Paired with no other action, through the proxy only.
        async def paired() -> bool:
            return bool((await box.get("/api/status")).json()["cloud"]["pairing"]["state"] == "paired")

        await wait_until(paired, timeout_s=30, what="pairing with the setup file's code")
        assert any(c.endswith(f":{sim.port}") for c in proxy.connects())
        assert not (state / HANDOFF_FILE).exists()
        owner = sim.state.admin_tokens.popitem()[1]
        assert (await box.post("/api/pairing", json={"code": "PAIR-NONE"})).status_code == 401
        assert (await box.post("/api/pairing", json={"code": "PAIR-NONE"},
                               headers={"Authorization": f"Bearer {owner}"})).status_code == 400
        settings = (await box.get("/api/status")).json()["settings"]
        assert settings["proxy"] == f"http://127.0.0.1:{proxy.port}" and settings["proxy_ca"] is True
        assert settings["proxy_auth"] is True
        assert settings["address"] == "192.168.50.10/24" and settings["language"] == "fr"
        assert "s3c-r3t" not in json.dumps(settings) and "s3c-r3t" not in (await box.get("/")).text
        checks = await health(ops)
        assert checks["setup.file"]["status"] == "ok"
        assert "removed from the file: proxy.password, pairing.code" in checks["setup.file"]["message"]
        assert "setup.pairing" not in checks
    # The next boot finds the file unchanged and leaves the settings alone.
    code, out, _ = await setup_apply(config, boot, network)
    assert code == 0 and "unchanged" in out


async def test_a_broken_setup_file_changes_nothing_and_says_what_is_wrong(tmp_path: Path) -> None:
    admin, ops = free_port(), free_port()
    config = box_config(tmp_path, "https://127.0.0.1:9", None, admin, ops)
    boot, network, state = tmp_path / "boot", tmp_path / "network", tmp_path / "state"
    boot.mkdir()
    (boot / SETUP_FILE).write_text('[proxy]\nurl = "http://127.0.0.1:9"\n[network]\ndns = ["127.0.0.1"]\n')
    assert (await setup_apply(config, boot, network))[0] == 0
    settings_before = (state / SETTINGS_FILE).read_bytes()
    unit_before = (network / "10-appliance-setup.network").read_bytes()
    broken = ('[proxy]\nurl = "http://shop:hunter2@10.0.0.9:3128"\n[network]\nmode = "static"\n'
              'address = "10.0.0.300/24"\ngateway = "10.0.0.1"\n[box]\nlanguage = "de"\n'
              '[pairing]\ncode = "PAIR-0001"\n')
    (boot / SETUP_FILE).write_text(broken)
    code, _, err = await setup_apply(config, boot, network)
    assert code == 2
    assert "box.language: must be one of en, fr; got 'de'" in err
    assert "proxy.url: put the user name and password in user and password, not in the URL" in err
    assert "the previous settings stay" in err and "hunter2" not in err
    assert (boot / SETUP_FILE).read_text() == broken  # untouched: the retailer fixes it, nothing is lost
    assert (state / SETTINGS_FILE).read_bytes() == settings_before
    assert (network / "10-appliance-setup.network").read_bytes() == unit_before
    assert not (state / HANDOFF_FILE).exists()
    status = json.loads((state / STATUS_FILE).read_text())
    assert status["state"] == "invalid" and "hunter2" not in json.dumps(status)
    async with real_box(config, admin, tmp_path / "box.log") as box:
        home = (await box.get("/")).text
        assert "appliance-setup.toml was not applied, the box keeps its previous settings" in home
        assert html.escape("network.address: not an address with its prefix length, such as 192.168.1.50/24: "
                           "'10.0.0.300/24'") in home
        checks = await health(ops)
        assert checks["setup.file"]["status"] == "fail" and "restart the box" in checks["setup.file"]["fix"]
        assert "127.0.0.1:9" in json.dumps((await box.get("/api/status")).json()["cloud"]["proxy"])


async def test_the_boot_partition_releases_a_paired_box(start_sim: StartSim, tmp_path: Path) -> None:
    sim = await start_sim()
    admin = free_port()
    config = box_config(tmp_path, sim.url, sim.ca_path, admin)
    boot, network, state = tmp_path / "boot", tmp_path / "network", tmp_path / "state"
    boot.mkdir()
    async with real_box(config, admin, tmp_path / "box.log") as box:
        assert (await box.post("/api/pairing", json={"code": sim.pair_code})).status_code == 200
    assert (state / OWNER_FILE).exists() and (state / PAIRING_FILE).exists()
    (boot / SETUP_FILE).write_text("[pairing]\nrelease = true\n")
    code, _, err = await setup_apply(config, boot, network)
    assert code == 0, err
    assert "release" not in tomllib.loads((boot / SETUP_FILE).read_text())["pairing"]  # one shot
    async with real_box(config, admin, tmp_path / "box.log") as box:
        status = (await box.get("/api/status")).json()["cloud"]["pairing"]
        assert status["state"] == "unpaired"
        assert not (state / OWNER_FILE).exists() and not (state / PAIRING_FILE).exists()
        # Unpaired again: the right store's code pairs it with no credential.
        assert (await box.post("/api/pairing", json={"code": sim.pair_code})).status_code == 200

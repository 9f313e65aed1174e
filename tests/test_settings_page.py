"""The homepage's Settings card: behind the admin token, validated with path-named errors,
saved where the setup file saves (so the network unit and the firewall follow), applied at
once where the running process can (language, admin token)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import httpx
import trio

from appliance.commands.setup import apply_setup
from appliance.config import SETTINGS_FILE, load_config
from appliance.health.firewall import render_config
from appliance.services.runtime import Runtime
from appliance.services.settings import RESTART_FILE
from appliance.setupfile import CA_FILE
from appliance.storage.owner import GENERATED_FILE
from tests.conftest import ConfigFactory, running_box
from tests.sync_helpers import ADMIN

PEM_START = "-----BEGIN CERTIFICATE-----"
NEW = "Correct-Horse-Battery-01"


async def post(runtime: Runtime, path: str, **fields: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{runtime.ports['admin']}") as admin:
        return await admin.post(path, data=fields)


async def homepage(runtime: Runtime) -> str:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{runtime.ports['admin']}") as admin:
        return (await admin.get("/")).text


def settings_of(runtime: Runtime) -> dict[str, Any]:
    path = Path(runtime.config.storage.dir) / SETTINGS_FILE
    return tomllib.loads(path.read_text()) if path.exists() else {}


async def test_language_and_name_need_the_token_and_language_applies_at_once(appliance: Runtime) -> None:
    page = await homepage(appliance)
    card = page[page.index("<section id=settings>"):]
    card = card[:card.index("</section>")]
    assert "action='/settings/box'" in card and "<script" not in card  # plain forms
    refused = await post(appliance, "/settings/box", name="Boulangerie", language="fr", token="guess")
    assert refused.status_code == 401 and "Nothing was changed" in refused.text
    assert settings_of(appliance) == {}
    bad = await post(appliance, "/settings/box", name="x", language="de", token=ADMIN)
    assert bad.status_code == 400 and "box.language: must be one of en, fr; got &#x27;de&#x27;" in bad.text
    done = await post(appliance, "/settings/box", name="Boulangerie", language="fr", token=ADMIN)
    assert done.status_code == 200 and "Settings saved" in done.text
    assert appliance.config.admin.language == "fr"  # at once
    assert settings_of(appliance)["admin"] == {"language": "fr"}
    assert settings_of(appliance)["discovery"] == {"name": "Boulangerie"}
    assert "Français" in await homepage(appliance)


async def test_a_static_address_is_checked_then_rendered_into_the_network_and_firewall(
        appliance: Runtime, tmp_path: Path) -> None:
    state = Path(appliance.config.storage.dir)
    bad = await post(appliance, "/settings/network", mode="static", address="192.168.1.50/24",
                     gateway="192.168.2.1", dns="192.168.1.1", token=ADMIN)
    assert bad.status_code == 400
    assert "network.gateway: 192.168.2.1 is not in the box&#x27;s network 192.168.1.0/24" in bad.text
    assert not (state / SETTINGS_FILE).exists() and not (state / RESTART_FILE).exists()
    done = await post(appliance, "/settings/network", mode="static", address="192.168.1.50/24",
                      gateway="192.168.1.1", dns="192.168.1.1, 192.168.1.2", ntp="192.168.1.1", token=ADMIN)
    assert done.status_code == 200 and "restarts its links" in done.text
    assert (state / RESTART_FILE).exists()  # the root helper renders the network and the firewall, then restarts
    # What the root helper runs, from the same files: the network unit and the firewall follow.
    config_file = tmp_path / "appliance.toml"
    config_file.write_text(f'[storage]\ndir = "{state}"\n')
    network = tmp_path / "network"
    await trio.to_thread.run_sync(apply_setup, config_file, tmp_path / "no-boot-partition", network)
    unit = (network / "10-appliance-setup.network").read_text()
    assert "Address=192.168.1.50/24\nGateway=192.168.1.1\nDNS=192.168.1.1\nDNS=192.168.1.2\nNTP=192.168.1.1\n" in unit
    ruleset = render_config(load_config(str(config_file))[0], str(config_file))
    assert "192.168.1.2" in ruleset and "udp dport 53" in ruleset
    back = await post(appliance, "/settings/network", mode="dhcp", token=ADMIN)
    assert back.status_code == 200 and settings_of(appliance)["network"] == {"address": "", "gateway": ""}


async def test_the_proxy_password_and_ca_are_kept_and_never_shown(appliance: Runtime, tmp_path: Path) -> None:
    import trustme
    ca = trustme.CA().cert_pem.bytes().decode()
    assert ca.startswith(PEM_START)
    broken = await post(appliance, "/settings/proxy", url="http://127.0.0.1:9", ca="not a certificate", token=ADMIN)
    assert broken.status_code == 400 and "proxy.ca:" in broken.text
    done = await post(appliance, "/settings/proxy", url="http://127.0.0.1:9", user="shop", password="Hunter-22",
                      ca=ca, token=ADMIN)
    assert done.status_code == 200, done.text
    state = Path(appliance.config.storage.dir)
    assert (state / CA_FILE).read_text() == ca
    saved = settings_of(appliance)
    assert saved["wan"]["proxy"] == "http://shop:Hunter-22@127.0.0.1:9"
    assert saved["cloud"]["ca_file"] == str(state / CA_FILE)
    # The password blank: kept, and so is the CA (not sent again); the user blank too.
    again = await post(appliance, "/settings/proxy", url="http://127.0.0.1:9", user="shop", token=ADMIN)
    assert again.status_code == 200 and settings_of(appliance) == saved
    blank = await post(appliance, "/settings/proxy", url="http://127.0.0.1:9", token=ADMIN)
    assert blank.status_code == 200 and settings_of(appliance) == saved
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{appliance.ports['admin']}") as admin:
        status = (await admin.get("/api/status")).json()["settings"]
        page = (await admin.get("/")).text
    # In effect after the restart the root helper makes; until then the card says so.
    assert status["proxy"] == "" and status["pending_restart"] is True and "changes saved" in page
    assert "Hunter-22" not in page and "Hunter-22" not in str(status)
    # An empty URL removes the proxy and its CA.
    off = await post(appliance, "/settings/proxy", url="", token=ADMIN)
    assert off.status_code == 200 and settings_of(appliance)["wan"]["proxy"] == ""
    assert "ca_file" not in settings_of(appliance).get("cloud", {})


async def test_the_json_route_takes_the_setup_file_sections(appliance: Runtime) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{appliance.ports['admin']}") as admin:
        assert (await admin.post("/api/settings", json={"box": {"language": "fr"}})).status_code == 401
        auth = {"Authorization": f"Bearer {ADMIN}"}
        bad = await admin.post("/api/settings", json={"network": {"mode": "static"}, "pairing": {}}, headers=auth)
        assert bad.status_code == 400
        wrong = await admin.post("/api/settings", json={"network": {"mode": "static", "address": "10.0.0.300/8",
                                                                    "gateway": "10.0.0.1"}}, headers=auth)
        assert wrong.status_code == 400 and wrong.json()["errors"] == [
            "network.address: not an address with its prefix length, such as 192.168.1.50/24: '10.0.0.300/8'"]
        done = await admin.post("/api/settings", json={"box": {"language": "fr"}}, headers=auth)
        assert done.status_code == 200 and done.json()["settings"]["language"] == "fr"


async def test_changing_the_admin_token(make_config: ConfigFactory) -> None:
    async with running_box(make_config(admin={"token": ""})) as box:
        generated = (Path(box.config.storage.dir) / GENERATED_FILE).read_text().strip()
        assert "made at first boot" in await homepage(box)
        mismatch = await post(box, "/settings/admin-token", new=NEW, confirm=NEW + "x",
                              token=generated)
        assert mismatch.status_code == 400 and "the two new tokens differ" in mismatch.text
        short = await post(box, "/settings/admin-token", new="short", confirm="short", token=generated)
        assert short.status_code == 400 and "must be 24 to 128 characters long" in short.text
        done = await post(box, "/settings/admin-token", new=NEW, confirm=NEW,
                          token=generated)
        assert done.status_code == 200 and "Admin token changed" in done.text
        assert (await post(box, "/settings/box", language="fr", token=generated)).status_code == 401
        assert (await post(box, "/settings/box", language="fr", token=NEW)).status_code == 200
    # Pinned in the configuration: refused, the configuration decides.
    async with running_box(make_config()) as pinned:
        refused = await post(pinned, "/settings/admin-token", new=NEW, confirm=NEW,
                             token=ADMIN)
        assert refused.status_code == 400 and "set in the configuration file" in refused.text


async def test_a_proxy_in_effect_is_shown_and_prefilled_without_its_credentials(make_config: ConfigFactory) -> None:
    async with running_box(make_config(wan={"proxy": "http://shop%20one:Hunter-22@127.0.0.1:9"})) as box:
        page = await homepage(box)
        assert "http://127.0.0.1:9 with a user name and password" in page  # the card
        assert "name=url placeholder='http://192.168.1.2:3128' value='http://127.0.0.1:9'" in page  # the form
        assert "Hunter-22" not in page and "shop one" not in page and "shop%20one" not in page

"""The WAN path (appliance/services/wan.py) and cloud sync through a real proxy (tinyproxy).

Failures are produced for real where loopback allows it (a refused port, an untrusted
certificate, a proxy that is down, a proxy that cannot reach the target); only the DNS
case is built by hand, since a real lookup would leave the machine.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from appliance.protocol.wan import Hop
from appliance.services.pairing import pair_from_web
from appliance.services.wan import (
    ProxySettings,
    WanConfigError,
    locate_failure,
    open_client,
    parse_proxy,
    proxy_for,
    ssl_context,
)
from appliance.storage.catalog import sync_state
from appliance.storage.events import outbox_stats
from tests.sync_helpers import StartBox, StartSim, api_client, fast_cloud, free_port, wait_until

if TYPE_CHECKING:
    from tests.proxy import Tinyproxy

pytest_plugins = ["tests.sync_fixtures", "tests.proxy"]


# --- [wan] proxy ---------------------------------------------------------------------------------


def test_proxy_urls() -> None:
    assert parse_proxy("") is None
    assert parse_proxy("http://10.0.0.1:3128") == ProxySettings(scheme="http", host="10.0.0.1", port=3128)
    assert parse_proxy("http://proxy.shop.lan") == ProxySettings(scheme="http", host="proxy.shop.lan", port=80)
    with_auth = parse_proxy("https://us%40r:p%3Ass@[fd00::1]:8443/")
    assert with_auth == ProxySettings(scheme="https", host="fd00::1", port=8443, username="us@r", password="p:ss")
    assert with_auth.address == "[fd00::1]:8443" and "p%3Ass" in with_auth.url
    assert "p:ss" not in repr(with_auth) and "p:ss" not in with_auth.address
    for bad in ("socks5://h:1", "http://", "http://h:99999", "http://h:1/path", "h:3128", "http://h h:1"):
        with pytest.raises(WanConfigError):
            parse_proxy(bad)


@given(st.text(max_size=60))
def test_any_proxy_setting_parses_or_raises_wan_config_error(value: str) -> None:
    try:
        settings = parse_proxy(value)
    except WanConfigError as exc:
        assert str(exc)
        return
    if settings is not None:
        assert settings.scheme in ("http", "https") and 0 < settings.port <= 65535 and settings.host
        assert parse_proxy(settings.url) == settings


@pytest.mark.parametrize(("host", "no_proxy", "direct"), [
    ("api.server.commerce-hub.io", (), False),
    ("api.server.commerce-hub.io", ("commerce-hub.io",), True),
    ("api.server.commerce-hub.io", (".commerce-hub.io",), True),
    ("api.server.commerce-hub.io", ("*.commerce-hub.io",), True),
    ("evilcommerce-hub.io", ("commerce-hub.io",), False),
    ("api.server.commerce-hub.io", ("*",), True),
    ("10.1.2.3", ("10.0.0.0/8",), True),
    ("10.1.2.3", ("192.168.0.0/16", "nonsense/99"), False),
    ("API.Server.Commerce-Hub.IO", ("commerce-hub.io:443",), True),
])
def test_no_proxy(host: str, no_proxy: tuple[str, ...], direct: bool) -> None:
    got = proxy_for(host, proxy="http://127.0.0.1:3128", no_proxy=no_proxy)
    assert (got is None) == direct


def test_an_extra_ca_is_added_to_the_system_roots(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    path = tmp_path / "proxy-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    baseline = ssl.create_default_context().cert_store_stats()["x509_ca"]
    ctx = ssl_context(str(path))
    assert ctx.cert_store_stats()["x509_ca"] == baseline + 1
    assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname
    with pytest.raises(WanConfigError, match="ca_file"):
        ssl_context(str(tmp_path / "missing.pem"))


# --- where it broke ----------------------------------------------------------------------------------


async def failure(url: str, *, proxy: str = "", ca_file: str = "") -> Any:
    client = open_client(url, proxy=proxy, ca_file=ca_file, connect_timeout_s=3, read_timeout_s=3)
    async with client:
        try:
            await client.get("/v1/whatever")
        except httpx.HTTPError as exc:
            return locate_failure(exc, url=url, proxy=parse_proxy(proxy))
    raise AssertionError("the call succeeded")


async def test_a_refused_port_is_the_tcp_hop() -> None:
    port = free_port()
    error = await failure(f"https://127.0.0.1:{port}")
    assert error.hop is Hop.TCP
    assert error.message == f"cannot connect to 127.0.0.1:{port}: connection refused"
    assert "443" in error.fix


async def test_an_untrusted_certificate_is_the_tls_hop(start_sim: StartSim) -> None:
    sim = await start_sim()
    error = await failure(sim.url)  # the simulator's CA is not given
    assert error.hop is Hop.TLS and "certificate is not trusted" in error.message
    assert "ca_file" in error.fix


async def test_a_proxy_that_is_down_is_the_proxy_hop(start_sim: StartSim) -> None:
    sim = await start_sim()
    port = free_port()
    error = await failure(sim.url, proxy=f"http://127.0.0.1:{port}", ca_file=str(sim.ca_path))
    assert error.hop is Hop.PROXY
    assert error.message == f"cannot reach the proxy 127.0.0.1:{port}: connection refused"
    assert "[wan] proxy" in error.fix


def test_a_name_that_does_not_resolve_is_the_dns_hop() -> None:
    cause = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    try:
        try:
            raise cause
        except socket.gaierror as exc:
            raise httpx.ConnectError(str(exc)) from exc
    except httpx.ConnectError as exc:
        error = locate_failure(exc, url="https://api.server.commerce-hub.io", proxy=None)
        via_proxy = locate_failure(exc, url="https://api.server.commerce-hub.io",
                                   proxy=parse_proxy("http://proxy.shop.lan:3128"))
    assert error.hop is Hop.DNS and error.message == ("cannot resolve api.server.commerce-hub.io: "
                                                      "name or service not known")
    assert via_proxy.hop is Hop.PROXY and via_proxy.message.startswith("cannot resolve the proxy proxy.shop.lan:3128")


async def test_the_environment_does_not_choose_the_path(start_sim: StartSim,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    sim = await start_sim()
    dead = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, dead)
    monkeypatch.setenv("SSL_CERT_FILE", "/nonexistent.pem")
    async with open_client(sim.url, ca_file=str(sim.ca_path), connect_timeout_s=3, read_timeout_s=3) as client:
        answer = await client.post("/v1/appliances/pair", json={"code": "x", "appliance_id": "b", "firmware": "1"})
    assert answer.status_code == 404  # it reached the platform directly


# --- through tinyproxy -------------------------------------------------------------------------------------


async def test_through_the_proxy_tls_is_still_verified(start_sim: StartSim, tinyproxy: Tinyproxy) -> None:
    sim = await start_sim()
    error = await failure(sim.url, proxy=tinyproxy.url)  # no CA: the tunnel works, the certificate does not
    assert error.hop is Hop.TLS and "certificate is not trusted" in error.message
    closed = free_port()
    tunnel = await failure(f"https://127.0.0.1:{closed}", proxy=tinyproxy.url, ca_file=str(sim.ca_path))
    assert tunnel.hop is Hop.PROXY and f"could not open a tunnel to 127.0.0.1:{closed}" in tunnel.message
    assert f"127.0.0.1:{sim.port}" in tinyproxy.connects()


async def test_sync_goes_through_the_proxy_and_names_it_when_it_is_down(
        start_sim: StartSim, start_box: StartBox, tmp_path: Path) -> None:
    from tests.proxy import run_tinyproxy

    sim = await start_sim()
    async with trio.open_nursery() as proxy_nursery:
        proxy: Tinyproxy = await proxy_nursery.start(run_tinyproxy, tmp_path / "proxy")
        runtime = await start_box(cloud=fast_cloud(sim), wan={"proxy": proxy.url})
        await pair_from_web(runtime, sim.pair_code)

        async def synced() -> bool:
            return (await runtime.db.read(sync_state)).cursor == sim.state.cursor

        await wait_until(synced, 20.0, "a sync through the proxy")
        async with api_client(runtime) as api:
            sale = {"id": "via-proxy", "device_id": "pos-1", "currency": "EUR", "total_cents": 1,
                    "lines": [{"sku": "A", "qty": 1, "unit_price_cents": 1}]}
            assert (await api.post("/v1/sales", json=sale)).status_code == 201
        await wait_until(lambda: "sale-via-proxy" in sim.state.events, 10.0, "the sale through the proxy")
        connects = proxy.connects()
        assert connects and set(connects) == {f"127.0.0.1:{sim.port}"}
        async with api_client(runtime, "admin") as admin:
            assert (await admin.get("/api/status")).json()["cloud"]["proxy"] == proxy.address
        proxy_nursery.cancel_scope.cancel()  # the proxy goes down
    # Nothing goes around it: every loop now fails at the proxy hop.
    # (A call in flight when it died sees its tunnel cut; the next ones find the port closed.)
    def at_the_proxy() -> bool:
        error = runtime.sync_status.pull.last_error
        return error is not None and error.hop is Hop.PROXY

    await wait_until(at_the_proxy, 10.0, "a pull failing at the proxy")
    error = runtime.sync_status.pull.last_error
    assert error is not None
    assert error.message == f"cannot reach the proxy {proxy.address}: connection refused"
    async with api_client(runtime) as api:
        assert (await api.post("/v1/sales", json={**sale, "id": "while-down"})).status_code == 201
    await wait_until(lambda: runtime.sync_status.push.last_error is not None
                     and runtime.sync_status.push.last_error.hop is Hop.PROXY, 10.0, "a push failing at the proxy")
    assert "sale-while-down" not in sim.state.events
    assert (await runtime.db.read(outbox_stats)).queued == 1
    checks = {c.name: c for c in await runtime.health.run_all()}
    assert checks["cloud.link"].message.startswith(f"cannot reach the proxy {proxy.address}: connection refused")
    assert "[wan] proxy" in checks["cloud.link"].fix
    async with api_client(runtime, "admin") as admin:
        home = (await admin.get("/")).text
    assert "failing (proxy)" in home and "check [wan] proxy" in home



async def test_a_wan_setting_that_cannot_be_used_is_shown_not_fatal(start_box: StartBox, tmp_path: Path) -> None:
    for wan, cloud, words in (
        ({"proxy": "http://proxy.shop.lan:3128/path"}, {}, "[wan] proxy"),
        ({}, {"ca_file": str(tmp_path / "missing-ca.pem")}, "cannot use CA file"),
    ):
        runtime = await start_box(wan=wan, cloud=cloud)
        checks = {c.name: c for c in await runtime.health.run_all()}
        assert checks["cloud.link"].status == "fail" and words in checks["cloud.link"].message
        async with api_client(runtime, "admin") as admin:
            status = (await admin.get("/api/status")).json()["cloud"]
            assert words in status["blocked"]
            assert "cannot sync" in (await admin.get("/")).text
        async with api_client(runtime) as api:  # the shop is served all the same
            assert (await api.get("/v1/products/x")).status_code == 503

"""One test over every WAN path: the same NO_PROXY rule and the same TLS floor for each.

Each path is one line of :data:`PATHS`: how to point it at a host in a config, and what
it then does (the proxy it goes through, or None, and its TLS context), read from the
objects the path itself builds in production.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import NamedTuple

import attrs
import pytest

from appliance.config import Config, WanConfig
from appliance.health.wan import probe_proxy
from appliance.services.log_shipping import intake_route
from appliance.services.media import blob_route
from appliance.services.servicebus import LinkOptions, proxy_settings
from appliance.services.wan import cloud_route


class Outbound(NamedTuple):
    proxy_host: str | None  # the proxy the path goes through; None: direct
    tls: ssl.SSLContext


def _sync(config: Config, host: str) -> Outbound:
    config = attrs.evolve(config, cloud=attrs.evolve(config.cloud, api_url=f"https://{host}"))
    target = cloud_route(config)
    return Outbound(target.proxy.host if target.proxy else None, target.ssl_context())


def _blob(config: Config, host: str) -> Outbound:
    target = blob_route(config, f"https://{host}")
    return Outbound(target.proxy.host if target.proxy else None, target.ssl_context())


def _logs(config: Config, host: str) -> Outbound:
    target = intake_route(config, f"https://{host}/v1/input")
    return Outbound(target.proxy.host if target.proxy else None, target.ssl_context())


def _servicebus(section: str) -> Callable[[Config, str], Outbound]:
    def outbound(config: Config, host: str) -> Outbound:
        sb = attrs.evolve(getattr(config, section), namespace=host)
        options = LinkOptions.from_config(sb, config.wan, queue="q")
        settings = proxy_settings(options.proxy)
        return Outbound(settings["proxy_hostname"] if settings else None, options.ssl_context())
    return outbound


PATHS: dict[str, Callable[[Config, str], Outbound]] = {
    "sync": _sync,
    "servicebus.orders": _servicebus("orders"),
    "servicebus.support": _servicebus("support"),
    "blob": _blob,
    "logs": _logs,
}

WAN = WanConfig(proxy="http://proxy.shop.lan:3128", no_proxy=("*.windows.net", "10.0.0.0/8"))


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize(("host", "direct"), [
    ("api.server.commerce-hub.io", False),
    ("e-serversync-ns.servicebus.windows.net", True),
    ("simplementedata.blob.core.windows.net", True),
    ("windows.net.example.com", False),
    ("10.20.30.40", True),
    ("11.20.30.40", False),
    ("api.logmatic.io", False),
])
def test_every_wan_path_honours_no_proxy(path: str, host: str, direct: bool) -> None:
    got = PATHS[path](Config(wan=WAN), host)
    assert got.proxy_host == (None if direct else "proxy.shop.lan")


@pytest.mark.parametrize("path", sorted(PATHS))
def test_every_wan_path_needs_tls_1_2_and_verifies(path: str) -> None:
    tls = PATHS[path](Config(wan=WAN), "api.server.commerce-hub.io").tls
    assert tls.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert tls.verify_mode is ssl.CERT_REQUIRED and tls.check_hostname


@pytest.mark.parametrize(("host", "direct"), [
    ("api.server.commerce-hub.io", False),
    ("e-serversync-ns.servicebus.windows.net", True),
    ("10.20.30.40", True),
])
def test_the_wan_health_checks_probe_the_way_the_paths_go(host: str, direct: bool) -> None:
    proxy = probe_proxy(Config(wan=WAN), host)
    assert (proxy is None) == direct
    assert all((PATHS[path](Config(wan=WAN), host).proxy_host is None) == direct for path in PATHS)

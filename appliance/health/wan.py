"""WAN health checks: each platform host the box needs, hop by hop, directly or via the proxy.

The same probe as the technician's preflight (:mod:`appliance.health.wanprobe`). Results
are cached for :data:`CACHE_S` so a homepage refresh does not cost a TLS handshake per host.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

import trio

from appliance.config import Config
from appliance.health.wanprobe import HostReport, ProbeProxy, Target, probe
from appliance.protocol.health import Check, Status
from appliance.protocol.orders import BUS_FIELDS, bus_settings
from appliance.protocol.text import Text
from appliance.protocol.wan import bypasses_proxy
from appliance.storage.pairing import StoreLink

__all__ = ["CACHE_S", "WanChecks", "wan_targets"]

CACHE_S = 60.0


def wan_targets(config: Config, store: StoreLink | None = None) -> list[Target]:
    """The hosts this configuration (and the pairing) needs, each marked required or optional.

    A Service Bus namespace is the one the box will really use: pairing's unless the config
    names another; with an ``endpoint`` override the probe goes where the box connects."""
    api = urlsplit(config.cloud.api_url)
    targets = [Target(Text("sync API"), api.hostname or "", api.port or 443)]
    defaults = Config()
    for name, label, required in (("orders", Text("online orders (Service Bus)"), True),
                                  ("support", Text("remote support (Service Bus)"), False)):
        bus = getattr(config, name)
        if not bus.enabled:
            continue
        paired = (store.service(name) if store is not None and not store.needs_repair else None) or {}
        namespace = bus_settings({f: getattr(bus, f) for f in BUS_FIELDS}, getattr(defaults, name).namespace,
                                 paired)["namespace"]
        targets.append(Target(label, namespace, 443, required, connect_to=bus.testing.endpoint,
                              ca_file=bus.ca_file))
    return targets


def _check(report: HostReport, via: str) -> Check:
    t = report.target
    name = f"wan.{t.host}"
    data = {"host": t.host, "port": t.port, "via": via, "hops": [h.hop for h in report.hops if h.ok]}
    failed = report.failed_hop
    if failed is None:
        message = (Text("{target}: {host}:{port} reachable via the proxy {proxy}", target=t.name, host=t.host,
                        port=t.port, proxy=via) if via else
                   Text("{target}: {host}:{port} reachable", target=t.name, host=t.host, port=t.port))
        return Check(name=name, status=Status.OK, message=message, data=data)
    message = (Text("{target}: {hop} failed via the proxy {proxy}: {error}", target=t.name, hop=failed.hop,
                    proxy=via, error=failed.message) if via else
               Text("{target}: {hop} failed: {error}", target=t.name, hop=failed.hop, error=failed.message))
    return Check(name=name, status=Status.FAIL if t.required else Status.WARN, message=message, fix=failed.fix,
                 data={**data, "failed_hop": failed.hop})


def probe_proxy(config: Config, host: str) -> ProbeProxy | None:
    """The proxy a probe of ``host`` goes through: the same NO_PROXY rule as the real
    paths, so a host they reach direct is probed direct."""
    if not config.wan.proxy or bypasses_proxy(host, config.wan.no_proxy):
        return None
    return ProbeProxy.parse(config.wan.proxy)


class WanChecks:
    """``store`` gives the current pairing (its Service Bus namespaces), read at each run."""

    def __init__(self, config: Config, *, store: Callable[[], StoreLink | None] = lambda: None,
                 timeout_s: float = 4.0) -> None:
        self.config = config
        self.store = store
        self.timeout_s = timeout_s
        self._cached: tuple[float, list[Target], list[Check]] | None = None

    async def __call__(self) -> list[Check]:
        now = trio.current_time()
        targets = wan_targets(self.config, self.store())
        # The cache holds for the same targets only: pairing changes the Service Bus
        # namespace, and a result probed for the default one (whose certificate cannot
        # match a test or demo endpoint) must not be shown for a minute after pairing.
        if self._cached is not None and now - self._cached[0] < CACHE_S and self._cached[1] == targets:
            return self._cached[2]
        results: dict[int, Check] = {}

        async def one(i: int, target: Target) -> None:
            proxy = probe_proxy(self.config, target.host)
            via = f"{proxy.host}:{proxy.port}" if proxy else ""
            report = await trio.to_thread.run_sync(
                lambda: probe(target, proxy=proxy, ca_file=self.config.cloud.ca_file, timeout=self.timeout_s))
            results[i] = _check(report, via)

        async with trio.open_nursery() as nursery:
            for i, target in enumerate(targets):
                nursery.start_soon(one, i, target)
        checks = [results[i] for i in range(len(targets))]
        self._cached = (now, targets, checks)
        return checks

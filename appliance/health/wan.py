"""WAN health checks: each platform host the box needs, hop by hop, directly or via the proxy.

The same probe as the technician's preflight (:mod:`appliance.health.wanprobe`). Results
are cached for :data:`CACHE_S` so a homepage refresh does not cost a TLS handshake per host.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import trio

from appliance.config import Config
from appliance.health.wanprobe import HostReport, Proxy, Target, probe
from appliance.protocol.health import Check, Status

__all__ = ["CACHE_S", "WanChecks", "wan_targets"]

CACHE_S = 60.0


def wan_targets(config: Config) -> list[Target]:
    """The hosts this configuration needs, each marked required or optional."""
    api = urlsplit(config.cloud.api_url)
    targets = [Target("sync API", api.hostname or "", api.port or 443)]
    for name, bus, required in (("online orders", config.orders, True), ("remote support", config.support, False)):
        if bus.enabled:
            targets.append(Target(f"{name} (Service Bus)", bus.namespace, 443, required))
    return targets


def _check(report: HostReport, via: str) -> Check:
    t = report.target
    name = f"wan.{t.host}"
    data = {"host": t.host, "port": t.port, "via": via, "hops": [h.hop for h in report.hops if h.ok]}
    failed = report.failed_hop
    if failed is None:
        return Check(name=name, status=Status.OK, message=f"{t.name}: {t.host}:{t.port} reachable{via}", data=data)
    return Check(name=name, status=Status.FAIL if t.required else Status.WARN,
                 message=f"{t.name}: {failed.hop} failed{via}: {failed.message}", fix=failed.fix,
                 data={**data, "failed_hop": failed.hop})


class WanChecks:
    def __init__(self, config: Config, *, timeout_s: float = 4.0) -> None:
        self.config = config
        self.timeout_s = timeout_s
        self._cached: tuple[float, list[Check]] | None = None

    async def __call__(self) -> list[Check]:
        now = trio.current_time()
        if self._cached is not None and now - self._cached[0] < CACHE_S:
            return self._cached[1]
        proxy = Proxy.parse(self.config.wan.proxy) if self.config.wan.proxy else None
        via = f" via the proxy {proxy.host}:{proxy.port}" if proxy else ""
        results: dict[int, Check] = {}
        targets = wan_targets(self.config)

        async def one(i: int, target: Target) -> None:
            report = await trio.to_thread.run_sync(
                lambda: probe(target, proxy=proxy, ca_file=self.config.cloud.ca_file, timeout=self.timeout_s))
            results[i] = _check(report, via)

        async with trio.open_nursery() as nursery:
            for i, target in enumerate(targets):
                nursery.start_soon(one, i, target)
        checks = [results[i] for i in range(len(targets))]
        self._cached = (now, checks)
        return checks

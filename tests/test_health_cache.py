"""Health results are computed once at a time and reused for a few seconds.

The homepage, /health and `appliance health` read the cache: a crowd of readers costs
one run; `POST /health` with the admin token is the forced refresh.
"""

from __future__ import annotations

import httpx
import trio
import trio.testing

from appliance.health import HealthRegistry
from appliance.protocol.health import Check, Status
from tests.conftest import ConfigFactory, running_box

AUTH = {"Authorization": "Bearer test-admin-token-0123456789"}


def slow_registry(started: list[float]) -> HealthRegistry:
    registry = HealthRegistry(cache_s=5.0)

    async def check() -> list[Check]:
        started.append(trio.current_time())
        await trio.sleep(1)
        return [Check(name="slow", status=Status.OK, message=f"run {len(started)}")]

    registry.add("slow", check)
    return registry


async def test_readers_share_one_run_and_its_results_for_cache_s(autojump_clock: trio.testing.MockClock) -> None:
    started: list[float] = []
    registry = slow_registry(started)
    seen: list[str] = []

    async def read() -> None:
        seen.append((await registry.latest())[0].message)

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(read)
    assert started == [0.0] and seen == ["run 1"] * 50  # 50 readers during one run: one run
    await trio.sleep(3.9)  # the run ended at 1.0: results reused until 6.0
    assert (await registry.latest())[0].message == "run 1"
    await trio.sleep(1.1)
    assert (await registry.latest())[0].message == "run 2" and started == [0.0, 6.0]
    assert (await registry.refresh())[0].message == "run 3"  # the admin's forced run
    assert registry.runs == 3


async def test_a_cancelled_reader_leaves_the_next_one_to_run(autojump_clock: trio.testing.MockClock) -> None:
    started: list[float] = []
    registry = slow_registry(started)
    with trio.move_on_after(0.5):
        await registry.latest()
    assert (await registry.latest())[0].message == "run 2" and started == [0.0, 0.5]


async def test_a_crowd_on_the_homepage_costs_one_run_and_refresh_needs_the_token(
        make_config: ConfigFactory) -> None:
    async with running_box(make_config()) as runtime, httpx.AsyncClient(timeout=30) as client:
        admin = f"http://127.0.0.1:{runtime.ports['admin']}/"
        ops = f"http://127.0.0.1:{runtime.ports['ops']}/health"
        before = runtime.health.runs
        statuses: list[int] = []

        async def get(url: str) -> None:
            statuses.append((await client.get(url)).status_code)

        async with trio.open_nursery() as nursery:
            for n in range(60):
                nursery.start_soon(get, admin if n % 2 else ops)
        assert statuses == [200] * 60
        # 60 readers would cost 60 runs; they cost one, a few if the machine is so loaded that
        # the 5 s cache expires during the crowd.
        assert runtime.health.runs - before <= 4
        assert (await client.post(ops)).status_code == 401
        runs = runtime.health.runs
        forced = await client.post(ops, headers=AUTH)
        assert forced.status_code == 200 and runtime.health.runs == runs + 1

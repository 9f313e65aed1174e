"""Fixtures for the cloud sync tests: the cloud simulator and a whole appliance pointed at it,
both in the test's trio loop, on loopback, over real TLS (the simulator's trustme CA).

A pytest plugin: ``pytest_plugins = ["tests.sync_fixtures"]`` in the test module (and do
not import this module, or pytest cannot rewrite its asserts). Helpers are in
``tests/sync_helpers.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from appliance.config import Config
from appliance.devkit.cloud import SimConfig, SimHandle, run_cloud_simulator
from appliance.services.assembly import service_specs
from appliance.services.runtime import Runtime
from appliance.supervisor import open_runtime, supervise_all
from tests.sync_helpers import StartBox, StartSim


@pytest.fixture
def start_sim(nursery: trio.Nursery, tmp_path: Path) -> StartSim:
    async def start(**overrides: Any) -> SimHandle:
        config = SimConfig(**{"products": 20, "tls_dir": str(tmp_path / "sim-tls"), **overrides})
        handle: SimHandle = await nursery.start(run_cloud_simulator, config)
        return handle

    return start


@pytest.fixture
async def start_box(make_config: Callable[..., Config]) -> AsyncIterator[StartBox]:
    """``await start_box(cloud={...}, wan={...})``: a whole appliance in the test's loop."""
    runtimes: list[Runtime] = []
    async with trio.open_nursery() as nursery:

        async def start(**sections: Any) -> Runtime:
            runtime = await open_runtime(make_config(**sections))
            runtimes.append(runtime)
            await nursery.start(lambda task_status: supervise_all(runtime, service_specs(runtime),
                                                                  task_status=task_status))
            return runtime

        yield start
        for runtime in runtimes:
            runtime.stopping.set()
    for runtime in runtimes:
        runtime.db.close()

"""Helpers of the cloud sync tests (the fixtures are in ``tests/sync_fixtures.py``)."""

from __future__ import annotations

import json
import socket
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import trio

from appliance.devkit.cloud import SimHandle, catalog_digest
from appliance.services.runtime import Runtime
from appliance.storage.catalog import ENTITY_TABLES

__all__ = ["ADMIN", "StartBox", "StartSim", "api_client", "fast_cloud", "free_port", "replica_digest", "sim_digest",
           "wait_until"]

ADMIN = "test-admin-token-0123456789"
StartSim = Callable[..., Awaitable[SimHandle]]
StartBox = Callable[..., Awaitable[Runtime]]


def free_port() -> int:
    """A loopback port with nothing listening on it right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fast_cloud(sim: SimHandle, **extra: Any) -> dict[str, Any]:
    """[cloud] for tests: the simulator's URL and CA, intervals in tens of milliseconds."""
    return {"api_url": sim.url, "ca_file": str(sim.ca_path), "pull_interval_s": 0.1, "push_interval_s": 0.1,
            "heartbeat_interval_s": 0.5, "backoff_initial_s": 0.05, "backoff_max_s": 0.4,
            "connect_timeout_s": 2.0, "read_timeout_s": 5.0, **extra}


async def wait_until(predicate: Callable[[], Awaitable[bool] | bool], timeout_s: float = 10.0,
                     what: str = "the condition") -> None:
    """Poll ``predicate`` (the simulator's state, the database) until true. These are other
    components' states with no event to wait on; 10 ms polls keep the test prompt."""
    with trio.move_on_after(timeout_s) as scope:
        while True:
            result = predicate()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await trio.sleep(0.01)
    if scope.cancelled_caught:
        raise AssertionError(f"{what} did not happen within {timeout_s} s")


def replica_digest(db_path: Path) -> str:
    """The digest of the box's replica, computed like the simulator's catalog digest."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        records = []
        for entity, table in ENTITY_TABLES.items():
            col = "sku" if table in ("products", "prices", "stock") else "key"
            for key, data in conn.execute(f"SELECT {col}, data FROM {table}"):
                records.append((entity, key, json.loads(data)))
    finally:
        conn.close()
    return catalog_digest(records)


def sim_digest(sim: SimHandle) -> str:
    """The digest of the simulator's live catalog."""
    return str(sim.state.summary()["digest"])


def api_client(runtime: Runtime, role: str = "api") -> httpx.AsyncClient:
    """A LAN client of one of the box's listeners, with the admin token."""
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{runtime.ports[role]}",
                             headers={"Authorization": f"Bearer {ADMIN}"}, trust_env=False, timeout=10.0)

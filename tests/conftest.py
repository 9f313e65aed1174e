"""Shared fixtures: a configuration for tests (loopback, ports 0, a temporary state dir)
and a running appliance in the test's own trio loop."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import settings

from appliance.config import Config, parse_config
from appliance.protocol import sigcheck
from appliance.services.assembly import service_specs
from appliance.services.runtime import Runtime
from appliance.supervisor import open_runtime, supervise_all

ConfigFactory = Callable[..., Config]

# No per-example deadline: timing belongs in benchmarks, and CI's two loaded cores make
# wall-clock deadlines flaky without saying anything about correctness.
settings.register_profile("appliance", deadline=None)
settings.load_profile("appliance")


def native_check() -> sigcheck.Check:
    """The native signed-request check, or the test skips with why it is not built (fails
    instead where APPLIANCE_NATIVE_REQUIRED=1: there it must be)."""
    if sigcheck.NATIVE is None:
        if os.environ.get("APPLIANCE_NATIVE_REQUIRED") == "1":
            pytest.fail(f"APPLIANCE_NATIVE_REQUIRED=1 but {sigcheck.NATIVE_MISSING}")
        pytest.skip(sigcheck.NATIVE_MISSING)
    return sigcheck.NATIVE


@pytest.fixture(params=["python", "native"])
def sig_check(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> sigcheck.Check:
    """Each signed-request check in turn; a box started in the test uses it (the key ring
    reads APPLIANCE_SIGCHECK when it is made)."""
    check = sigcheck.PYTHON if request.param == "python" else native_check()
    monkeypatch.setenv(sigcheck.ENVIRONMENT, check.name)
    return check


def device_key(device_id: str) -> bytes:
    """A test device's pre-shared key ([[devices]] key), the same wherever a test asks."""
    return hashlib.sha256(b"test device key\x00" + device_id.encode()).digest()


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def test_config_data(state_dir: Path) -> dict[str, Any]:
    """TOML-shaped data for a box on loopback with every port chosen by the kernel."""
    ports = dict.fromkeys(["admin", "api", "events", "media", "provisioning", "ops", "support"], 0)
    return {
        "lan": {"bind": "127.0.0.1", "ports": {**ports, "discovery": 0}},
        "storage": {"dir": str(state_dir)},
        # No first-start ticket: tests count what each printer receives (tests/test_ticket.py
        # switches it on).
        "admin": {"token": "test-admin-token-0123456789", "first_start_ticket": False},
        "supervisor": {"shutdown_deadline_s": 5.0},
        # Nothing in a test may reach a real host or broadcast on a real LAN: the cloud is
        # a closed port on loopback unless a test points it at its simulator.
        "cloud": {"api_url": "https://127.0.0.1:9"},
        "discovery": {"enabled": False},
        "orders": {"enabled": False},
    }


test_config_data.__test__ = False  # type: ignore[attr-defined]


@pytest.fixture
def make_config(tmp_path: Path) -> ConfigFactory:
    """``make_config(**sections)``: the test config with sections deep-merged over it."""

    def make(**extra: Any) -> Config:
        return parse_config(deep_merge(test_config_data(tmp_path / "state"), extra))

    return make


@asynccontextmanager
async def running_box(config: Config) -> AsyncIterator[Runtime]:
    """A whole appliance (every service of the assembly) with ``config``, in the caller's
    trio loop; stopped gracefully (as by SIGTERM) when the block ends."""
    runtime = await open_runtime(config)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: supervise_all(runtime, service_specs(runtime),
                                                                  task_status=task_status))
            yield runtime
            runtime.stopping.set()
    finally:
        runtime.db.close()


@pytest.fixture
async def appliance(make_config: ConfigFactory) -> AsyncIterator[Runtime]:
    """A whole appliance with the test configuration."""
    async with running_box(make_config()) as runtime:
        yield runtime

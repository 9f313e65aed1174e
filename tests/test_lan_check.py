"""The technician's LAN check (scripts/lan-check): finds a running box by its discovery
probe and tries every listener the box announced. Loopback only: --no-broadcast."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from appliance.config import LISTENER_ROLES
from appliance.services.runtime import Runtime
from tests.conftest import ConfigFactory, running_box

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def box(make_config: ConfigFactory) -> AsyncIterator[Runtime]:
    # Beacons go to 127.0.0.1 (the box's own port, ignored by it): nothing is broadcast.
    async with running_box(make_config(discovery={"enabled": True, "broadcast": ["127.0.0.1"]})) as runtime:
        yield runtime


def lan_check(*args: str) -> subprocess.CompletedProcess[str]:
    # -I: isolated, as on a technician's laptop with a bare Python (no site-packages, no appliance).
    return subprocess.run([sys.executable, "-I", str(ROOT / "scripts" / "lan-check"), "--no-broadcast", *args],
                          capture_output=True, text=True, timeout=60, check=False)


async def test_finds_the_box_and_every_port_answers(box: Runtime) -> None:
    port = box.ports["discovery"]
    result = await trio.to_thread.run_sync(lambda: lan_check("--target", "127.0.0.1", "--port", str(port), "--json"))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    (found,) = report["boxes"]
    assert found["announce"]["appliance_id"] == box.appliance_id
    assert found["ports"] == dict.fromkeys(LISTENER_ROLES, "ok")
    # A technician's probe is answered but does not become a device to adopt.
    devices = await box.db.read(lambda c: c.execute("SELECT count(*) FROM devices").fetchone()[0])
    assert devices == 0


async def test_a_dead_listener_is_named(box: Runtime) -> None:
    # The box announces its ports; make one of them point at a port nobody listens on.
    box.ports.bind("media", 9)
    result = await trio.to_thread.run_sync(
        lambda: lan_check("--target", "127.0.0.1", "--port", str(box.ports["discovery"])))
    assert result.returncode == 1
    assert "FAIL  media" in result.stdout and "connection refused" in result.stdout


def test_nobody_answers() -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        result = lan_check("--target", "127.0.0.1", "--port", str(port), "--timeout", "0.5")
    assert result.returncode == 2
    assert "No appliance answered" in result.stdout and "--target" in result.stdout

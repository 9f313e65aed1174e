"""Health checks of the machine and the listeners, /health, the homepage and `appliance health`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import trio

from appliance.commands.health import collect
from appliance.config import Config
from appliance.health.listeners import listener_checks
from appliance.health.system import SystemPaths, _collect
from appliance.health.wan import WanChecks
from appliance.protocol.health import Check, Status, exit_code, worst
from appliance.services.runtime import Runtime
from appliance.storage.pairing import StoreLink


def fake_tree(root: Path, *, temp_milli: int | None = None, throttled: str | None = None,
              ext4_errors: int | None = None, synced: bool = True) -> SystemPaths:
    if temp_milli is not None:
        zone = root / "sys/class/thermal/thermal_zone0"
        zone.mkdir(parents=True)
        (zone / "temp").write_text(f"{temp_milli}\n")
    if throttled is not None:
        fw = root / "sys/devices/platform/soc/soc:firmware"
        fw.mkdir(parents=True)
        (fw / "get_throttled").write_text(throttled + "\n")
    if ext4_errors is not None:
        dev = root / "sys/fs/ext4/mmcblk0p2"
        dev.mkdir(parents=True)
        (dev / "errors_count").write_text(f"{ext4_errors}\n")
    (root / "lib/systemd").mkdir(parents=True)
    (root / "lib/systemd/systemd-timesyncd").write_text("")
    if synced:
        (root / "run/systemd/timesync").mkdir(parents=True)
        (root / "run/systemd/timesync/synchronized").write_text("")
    return SystemPaths(root)


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_a_healthy_pi(tmp_path: Path) -> None:
    paths = fake_tree(tmp_path, temp_milli=52_000, throttled="0x0", ext4_errors=0)
    checks = by_name(_collect(tmp_path, paths, time.time()))
    assert checks["system.temperature"].status is Status.OK and "52 °C" in checks["system.temperature"].message
    assert checks["system.power"].status is Status.OK
    assert checks["system.fs.mmcblk0p2"].status is Status.OK
    assert checks["system.clock"].status is Status.OK


def test_a_struggling_pi_says_what_to_do(tmp_path: Path) -> None:
    paths = fake_tree(tmp_path, temp_milli=84_500, throttled="0x50005", ext4_errors=3, synced=False)
    checks = by_name(_collect(tmp_path, paths, time.time()))
    assert checks["system.temperature"].status is Status.FAIL and "ventilation" in checks["system.temperature"].fix
    power = checks["system.power"]
    assert power.status is Status.FAIL and "under-voltage now" in power.message and "power supply" in power.fix
    assert checks["system.fs.mmcblk0p2"].status is Status.FAIL and "SD card" in checks["system.fs.mmcblk0p2"].fix
    assert checks["system.clock"].status is Status.WARN
    assert exit_code(list(checks.values())) == 2


def test_past_throttling_is_a_warning(tmp_path: Path) -> None:
    paths = fake_tree(tmp_path, throttled="0x50000")
    assert by_name(_collect(tmp_path, paths, time.time()))["system.power"].status is Status.WARN


def test_a_clock_in_the_past_fails(tmp_path: Path) -> None:
    paths = fake_tree(tmp_path)
    clock = by_name(_collect(tmp_path, paths, 86400.0))["system.clock"]
    assert clock.status is Status.FAIL and "1970-01-02" in clock.message and "NTP" in clock.fix


def test_missing_sources_are_left_out(tmp_path: Path) -> None:
    names = set(by_name(_collect(tmp_path, SystemPaths(tmp_path / "nothing"), time.time())))
    assert names == {"system.disk", "system.clock"}


async def test_listener_check_sees_a_closed_port() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    open_port = listener.getsockname()[1]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]  # bound, not listening: refuses connections
    try:
        checks = await listener_checks("0.0.0.0", {"api": open_port, "media": closed_port})
    finally:
        listener.close()
        closed.close()
    assert [c.status for c in checks] == [Status.OK, Status.FAIL]
    assert str(closed_port) in checks[1].message


async def test_listener_check_says_why_when_a_port_does_not_answer(autojump_clock: trio.abc.Clock) -> None:
    """A port whose SYNs are dropped (a firewall rule; here a full accept queue) times out:
    the check says so rather than ending on an empty error."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    waiting = []
    try:
        for _ in range(4):  # fill the accept queue: later SYNs are dropped
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            waiting.append(s)
        start = trio.current_time()
        [check] = await listener_checks("127.0.0.1", {"api": port})
    finally:
        listener.close()
        for s in waiting:
            s.close()
    assert check.status is Status.FAIL
    assert check.message.endswith("does not accept connections: no answer within 2 s")
    assert trio.current_time() - start == 2.0


async def test_health_endpoint_homepage_and_command(appliance: Runtime) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        report = (await client.get(f"http://127.0.0.1:{appliance.ports['ops']}/health")).json()
        names = {c["name"] for c in report["checks"]}
        assert {"system.disk", "system.clock", "lan.listener.api", "lan.listener.support"} <= names
        assert all(c["status"] == "ok" for c in report["checks"] if c["name"].startswith("lan.listener."))
        home = await client.get(f"http://127.0.0.1:{appliance.ports['admin']}/")
        assert "<h2>Health checks</h2>" in home.text and "role=status" in home.text
    checks = await trio.to_thread.run_sync(collect, "127.0.0.1", appliance.ports["ops"], Path("/tmp"))
    assert {c.name for c in checks} == names
    assert worst(checks) in (Status.OK, Status.WARN, Status.FAIL)


def test_health_command_when_the_box_is_down(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[lan]\nbind = "127.0.0.1"\n[lan.ports]\nops = {port}\n[storage]\ndir = "{tmp_path}"\n')
    result = subprocess.run([sys.executable, "-m", "appliance", "health", "--config", str(cfg), "--json"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    report = json.loads(result.stdout)
    first = report["checks"][0]
    assert first["name"] == "appliance.process" and first["status"] == "fail"
    assert "systemctl status appliance" in first["fix"]
    assert "system.disk" in {c["name"] for c in report["checks"]}
    text = subprocess.run([sys.executable, "-m", "appliance", "health", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert text.returncode == 2 and "FAIL  appliance.process" in text.stdout and "fix:" in text.stdout


async def test_wan_checks_name_the_failing_hop(appliance: Runtime) -> None:
    async with httpx.AsyncClient(timeout=20) as client:
        report = (await client.get(f"http://127.0.0.1:{appliance.ports['ops']}/health")).json()
    wan = [c for c in report["checks"] if c["name"].startswith("wan.")]
    assert [c["name"] for c in wan] == ["wan.127.0.0.1"]  # the test config's cloud: a closed port
    assert wan[0]["status"] == "fail" and wan[0]["data"]["failed_hop"] == "tcp"
    assert "sync API: tcp failed" in wan[0]["message"]


def test_wan_targets_follow_the_pairing_and_the_endpoint(make_config: Callable[..., Config]) -> None:
    """The WAN checks probe the namespace the box will really use, where it really connects."""
    from appliance.health.wan import wan_targets
    from appliance.storage.pairing import StoreLink

    unpaired = wan_targets(make_config(orders={"enabled": True}))
    assert [t.host for t in unpaired] == ["127.0.0.1", "e-serversync-ns.servicebus.windows.net"]
    store = StoreLink(store_id="s1", token="t", services={"orders": {"namespace": "localhost", "queue": "q"}})
    config = make_config(orders={"enabled": True, "testing": {"endpoint": "localhost:4443"}, "ca_file": "/x/ca.pem"})
    bus = wan_targets(config, store)[1]
    assert (bus.host, bus.connect_to, bus.ca_file, bus.required) == ("localhost", "localhost:4443", "/x/ca.pem", True)
    named = wan_targets(make_config(orders={"enabled": True, "namespace": "mine.servicebus.windows.net"}), store)[1]
    assert named.host == "mine.servicebus.windows.net"  # a namespace set in the config wins over pairing
    assert [t.host for t in wan_targets(make_config())] == ["127.0.0.1"]  # orders off in the test config


async def test_wan_results_are_probed_again_once_pairing_names_the_service_bus_namespace(
        make_config: Callable[..., Config]) -> None:
    # Probed before pairing, the default namespace cannot match the certificate of the
    # namespace the box really uses: that result must not outlive the pairing that changes it.
    config = make_config(orders={"enabled": True, "testing": {"endpoint": "127.0.0.1:9"}})
    link: list[StoreLink] = []
    checks = WanChecks(config, store=lambda: link[0] if link else None, timeout_s=2.0)
    before = {c.name for c in await checks()}
    assert "wan.e-serversync-ns.servicebus.windows.net" in before
    assert {c.name for c in await checks()} == before  # same targets: the cached result
    link.append(StoreLink(store_id="s1", token="t", services={"orders": {"namespace": "sb-test.example"}}))
    after = {c.name for c in await checks()}
    assert "wan.sb-test.example" in after and "wan.e-serversync-ns.servicebus.windows.net" not in after

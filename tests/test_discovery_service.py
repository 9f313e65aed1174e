"""The discovery service on real UDP sockets on loopback, the beacon under a virtual clock,
the interface reader, and ``appliance discover`` against a running box.

Nothing here broadcasts: beacons go to 127.0.0.1 (the box's own port) or to an injected
send function. A second loopback address (127.0.0.2) plays a second device where a test
needs two sources.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from appliance import __version__
from appliance.protocol import discovery as wire
from appliance.protocol.health import Status
from appliance.services.board import ServiceState
from appliance.services.discovery import DiscoveryBindError, Limits, run_discovery
from appliance.services.netif import Interface, beacon_interfaces, interfaces, parse_ifreq_address, route_source
from appliance.services.runtime import Runtime
from appliance.storage.devices import AdoptionState, get_device, list_devices
from appliance.storage.pairing import StoreLink
from appliance.supervisor import open_runtime

from .conftest import ConfigFactory
from .conftest import running_box as box_with

DEADLINE_S = 5.0


def discovery_on(**extra: Any) -> dict[str, Any]:
    # Beacons to 127.0.0.1 land on the box's own socket: its own beacons, never a real LAN.
    return {"discovery": {"enabled": True, "broadcast": ["127.0.0.1"], **extra}}


@asynccontextmanager
async def running_box(make_config: ConfigFactory, **sections: Any) -> AsyncIterator[Runtime]:
    """The whole appliance with discovery on, on loopback."""
    async with box_with(make_config(**{**discovery_on(), **sections})) as runtime:
        yield runtime


@asynccontextmanager
async def discovery_only(make_config: ConfigFactory, **kwargs: Any) -> AsyncIterator[Runtime]:
    """Just the discovery service, on its own runtime."""
    runtime = await open_runtime(make_config(**discovery_on()))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run_discovery, runtime, **kwargs))
            yield runtime
            nursery.cancel_scope.cancel()
    finally:
        runtime.db.close()


class FakeDevice:
    """A device on loopback: sends probes, reads replies."""

    def __init__(self, address: str = "127.0.0.1") -> None:
        self.address = address
        self.sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    async def __aenter__(self) -> FakeDevice:
        await self.sock.bind((self.address, 0))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.sock.close()

    async def send(self, data: bytes, port: int) -> None:
        await self.sock.sendto(data, ("127.0.0.1", port))

    async def probe(self, port: int, *, device_id: str = "pos-1", nonce: str = "n-1", kind: str = "pos",
                    device_port: int = 8081, name: str = "Till 1") -> None:
        await self.send(wire.encode(wire.Probe(device_id=device_id, kind=kind, name=name, port=device_port,
                                               nonce=nonce)), port)

    async def reply(self) -> tuple[wire.Announce, bytes, tuple[str, int]]:
        with trio.fail_after(DEADLINE_S):
            data, source = await self.sock.recvfrom(4096)
        message = wire.decode(data)
        assert isinstance(message, wire.Announce)
        return message, data, source

    def pending_replies(self) -> int:
        """Replies already queued on the socket (read without waiting)."""
        count = 0
        with socket.socket(fileno=os.dup(self.sock.fileno())) as plain:
            plain.setblocking(False)
            while True:
                try:
                    plain.recv(4096)
                except BlockingIOError:
                    return count
                count += 1


async def settled() -> None:
    """Every datagram sent on loopback is in the box's socket already, so once every task is
    blocked (trio polls I/O before deciding so) the box has handled all of them."""
    with trio.fail_after(DEADLINE_S):
        await trio.testing.wait_all_tasks_blocked()


async def ask(port: int, nonce: str = "barrier") -> wire.Announce:
    """Probe from a second address and wait for the answer: everything sent before is handled."""
    async with FakeDevice("127.0.0.2") as other:
        await other.probe(port, device_id="barrier", kind="tool", nonce=nonce)
        announce, _, _ = await other.reply()
    return announce


# --- replies ---------------------------------------------------------------------------------


async def test_a_probe_gets_a_reply_with_the_effective_port_map(make_config: ConfigFactory) -> None:
    async with running_box(make_config) as runtime, FakeDevice() as device:
        port = runtime.ports["discovery"]
        assert port != 0  # bound on a port chosen by the kernel, and published
        await device.probe(port, nonce="abc123")
        announce, _, source = await device.reply()
        assert announce.ports == runtime.ports
        assert all(announce.ports[r] != 0 for r in ("admin", "api", "events", "ops", "discovery"))
        assert announce.address == "127.0.0.1"
        assert announce.nonce == "abc123"
        assert announce.appliance_id == runtime.appliance_id
        assert announce.firmware == __version__
        assert (announce.store_id, announce.sig) == (None, None)  # not paired
        assert source == ("127.0.0.1", port)
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"http://127.0.0.1:{runtime.ports['ops']}/metrics")).text
        assert "appliance_discovery_replies_total 1" in metrics
        assert runtime.board.get("discovery").state is ServiceState.RUNNING  # type: ignore[union-attr]


async def test_a_paired_box_signs_with_the_store_secret(make_config: ConfigFactory) -> None:
    async with discovery_only(make_config) as runtime, FakeDevice() as device:
        port = runtime.ports["discovery"]
        runtime.set_store(StoreLink(store_id="store-42", token="t", store_secret="s3cret"))
        await device.probe(port)
        announce, data, _ = await device.reply()
        assert announce.store_id == "store-42"
        assert announce.sig is not None
        assert wire.verify(data, b"s3cret")
        assert not wire.verify(data, b"other")
        # A pairing the platform refused no longer vouches for the box.
        runtime.set_store(StoreLink(store_id="store-42", token="t", store_secret="s3cret", needs_repair=True))
        await device.probe(port)
        announce, _, _ = await device.reply()
        assert (announce.store_id, announce.sig) == (None, None)


async def test_a_flood_from_one_source_gets_rate_limited_replies(make_config: ConfigFactory) -> None:
    limits = Limits(rate_per_s=0.001, burst=3, global_rate_per_s=1000, global_burst=1000)
    async with discovery_only(make_config, limits=limits) as runtime, FakeDevice() as device:
        port = runtime.ports["discovery"]
        for i in range(20):
            await device.probe(port, nonce=f"n{i}")
        await ask(port)  # answered: so the 20 before it were handled
        await settled()
        assert device.pending_replies() == 3
        assert runtime.metrics.value("discovery_rate_limited", scope="source") == 17
        assert runtime.metrics.value("discovery_replies") == 4


async def test_the_global_cap_holds_across_sources(make_config: ConfigFactory) -> None:
    limits = Limits(rate_per_s=0.001, burst=3, global_rate_per_s=0.001, global_burst=5)
    async with discovery_only(make_config, limits=limits) as runtime, FakeDevice() as first, \
            FakeDevice("127.0.0.3") as second, FakeDevice("127.0.0.4") as third:
        port = runtime.ports["discovery"]
        for i in range(3):
            await first.probe(port, nonce=f"a{i}")
        for i in range(3):
            await second.probe(port, nonce=f"b{i}")
        await third.probe(port)  # its own bucket is full, the global one is empty
        await settled()
        assert runtime.metrics.value("discovery_probes") == 7
        assert (first.pending_replies(), second.pending_replies(), third.pending_replies()) == (3, 2, 0)
        assert runtime.metrics.value("discovery_rate_limited", scope="global") == 2
        assert runtime.metrics.value("discovery_replies") == 5


async def test_garbage_is_counted_and_does_not_stop_replies(make_config: ConfigFactory) -> None:
    async with running_box(make_config) as runtime, FakeDevice() as device:
        port = runtime.ports["discovery"]
        garbage = [
            b"", b"hello", b"M-SEARCH * HTTP/1.1\r\n\r\n", b"CHUB\x02{}", b"CHUB\x01{not json", b"CHUB\x01\xff\xfe",
            b"CHUB\x01" + json.dumps({"type": "probe", "device_id": "x"}).encode(),
            b"CHUB\x01" + json.dumps({"type": "hello"}).encode(),
            b"CHUB\x01" + b" " * 1500, b"CHUB\x01" + b"x" * 3000,
        ]
        for data in garbage:
            await device.send(data, port)
        await device.probe(port, nonce="after")
        announce, _, _ = await device.reply()
        assert announce.nonce == "after"
        m = runtime.metrics
        counts = {r: m.value("discovery_invalid", reason=r)
                  for r in ("bad_magic", "bad_version", "bad_json", "bad_field", "unknown_type", "too_large")}
        assert counts == {"bad_magic": 3, "bad_version": 1, "bad_json": 2, "bad_field": 1, "unknown_type": 1,
                          "too_large": 2}
        assert runtime.board.get("discovery").crashes == 0  # type: ignore[union-attr]


async def test_own_beacons_are_ignored_and_other_boxes_counted(make_config: ConfigFactory) -> None:
    async with running_box(make_config) as runtime, FakeDevice() as device:
        port = runtime.ports["discovery"]
        with trio.fail_after(DEADLINE_S):
            while runtime.metrics.value("discovery_announces_seen", origin="own") < 1:
                await ask(port)  # the start beacon goes to 127.0.0.1, i.e. to the box itself
        other = wire.Announce(appliance_id="box-other", store_id=None, name="x", firmware="1", address="10.1.1.1",
                              ports={"admin": 80}, nonce=None, ts=0.0)
        await device.send(wire.encode(other), port)
        await ask(port)
        assert runtime.metrics.value("discovery_announces_seen", origin="other") == 1
        assert runtime.metrics.value("discovery_invalid", reason="bad_field") == 0
        assert await runtime.db.read(list_devices) == []  # announces and tools register nothing


# --- the registry ----------------------------------------------------------------------------


async def test_the_registry_sees_the_device(make_config: ConfigFactory) -> None:
    async with running_box(make_config) as runtime, FakeDevice() as device:
        port = runtime.ports["discovery"]
        seen = runtime.device_changes.version
        # A probe with no command port (a technician's tool) is answered but not registered.
        await device.probe(port, device_id="lan-check-1", kind="technician", device_port=0)
        assert (await device.reply())[0].nonce == "n-1"
        await device.probe(port, device_id="kds-1", kind="kds", name="Kitchen", device_port=9100)
        with trio.fail_after(DEADLINE_S):
            seen = await runtime.device_changes.wait(seen)
        assert [d.id for d in await runtime.db.read(list_devices)] == ["kds-1"]
        found = await runtime.db.read(partial(get_device, device_id="kds-1"))
        assert found is not None
        assert (found.kind, found.name, found.address, found.port, found.state) == (
            "kds", "Kitchen", "127.0.0.1", 9100, AdoptionState.PENDING)
        assert found.first_seen == found.last_seen
        # The same probe again changes nothing a dispatcher cares about: no notification;
        # an unsigned probe asking for a new command port is ignored and counted (anyone can
        # send one). The first notification must be the next new device's.
        await device.probe(port, device_id="kds-1", kind="kds", name="Kitchen", device_port=9100)
        await device.probe(port, device_id="kds-1", kind="kds", name="Kitchen", device_port=9200)
        await device.probe(port, device_id="kds-2", kind="kds", name="Kitchen 2", device_port=9100)
        with trio.fail_after(DEADLINE_S):
            version = await runtime.device_changes.wait(seen)
        found = await runtime.db.read(partial(get_device, device_id="kds-1"))
        assert found is not None and found.port == 9100
        assert version == seen + 1
        assert runtime.metrics.value("discovery_moves_refused", reason="unsigned") == 1
        rendered = runtime.metrics.render()
        assert 'appliance_discovery_probes_total 5' in rendered


async def test_the_registry_queue_is_bounded(make_config: ConfigFactory) -> None:
    limits = Limits(global_rate_per_s=1e6, global_burst=1e6)
    async with discovery_only(make_config, limits=limits) as runtime:
        port = runtime.ports["discovery"]
        release, blocked = trio.Event(), trio.Event()

        async def hold_the_writer() -> None:  # a slow disk: sightings pile up in the queue
            async with runtime.db._write_lock:
                blocked.set()
                await release.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold_the_writer)
            await blocked.wait()
            for i in range(200):
                async with FakeDevice(f"127.0.1.{i + 1}") as device:
                    await device.probe(port, device_id=f"dev-{i}")
            await ask(port)  # replies do not wait for the disk
            release.set()
        dropped = runtime.metrics.value("discovery_registry_dropped")
        assert 100 < dropped < 200
        assert runtime.metrics.value("discovery_replies") == 201
        # Every sighting that got into the queue is written (each one notifies a new device).
        seen = 0
        with trio.fail_after(DEADLINE_S):
            while len(await runtime.db.read(list_devices)) < 200 - dropped:
                seen = await runtime.device_changes.wait(seen)
        assert len(await runtime.db.read(list_devices)) == 200 - dropped


# --- beacons, under a virtual clock ------------------------------------------------------------


class FixedRandom(random.Random):
    def random(self) -> float:
        return 0.5  # no jitter: exact intervals


async def test_beacons_at_start_every_interval_and_on_address_change(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    runtime = await open_runtime(make_config(discovery={"enabled": True, "interval_s": 10.0}))
    ifaces = [Interface(name="eth0", index=2, address="192.0.2.10", broadcast="192.0.2.255", up=True, loopback=False),
              Interface(name="lo", index=1, address="127.0.0.1", broadcast=None, up=True, loopback=True)]
    sent: list[tuple[float, bytes, tuple[str, int]]] = []

    async def send(data: bytes, target: tuple[str, int]) -> None:
        sent.append((trio.current_time(), data, target))

    try:
        async with trio.open_nursery() as nursery:
            t0 = trio.current_time()
            port = await nursery.start(partial(run_discovery, runtime, beacon_send=send,
                                               interface_source=lambda: list(ifaces), rng=FixedRandom()))
            await trio.sleep_until(t0 + 25)
            ifaces[0] = Interface(name="eth0", index=2, address="192.0.2.77", broadcast="192.0.2.255", up=True,
                                  loopback=False)
            await trio.sleep_until(t0 + 37)
            checks = await runtime.health.run_all()
            nursery.cancel_scope.cancel()
    finally:
        runtime.db.close()
    assert [round(t - t0, 6) for t, _, _ in sent] == [0, 10, 20, 26, 36]
    assert {target for _, _, target in sent} == {("192.0.2.255", port)}  # never loopback
    announces = [wire.decode(data) for _, data, _ in sent]
    assert [a.address for a in announces if isinstance(a, wire.Announce)] == ["192.0.2.10"] * 3 + ["192.0.2.77"] * 2
    assert all(isinstance(a, wire.Announce) and a.nonce is None for a in announces)
    assert runtime.metrics.value("discovery_beacons") == 5
    (check,) = [c for c in checks if c.name == "discovery"]
    assert check.status is Status.OK and "192.0.2.255" in check.message


async def test_a_failing_beacon_is_counted_and_reported(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    runtime = await open_runtime(make_config(discovery={"enabled": True, "broadcast": ["192.0.2.255"]}))
    ifaces = [Interface(name="eth0", index=2, address="192.0.2.10", broadcast="192.0.2.255", up=True, loopback=False)]

    async def send(data: bytes, target: tuple[str, int]) -> None:
        raise PermissionError(1, "Operation not permitted")

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run_discovery, runtime, beacon_send=send, interface_source=lambda: ifaces))
            await trio.sleep(15)
            (check,) = [c for c in await runtime.health.run_all() if c.name == "discovery"]
            nursery.cancel_scope.cancel()
    finally:
        runtime.db.close()
    assert runtime.metrics.value("discovery_send_errors", what="beacon") == 2
    assert check.status is Status.WARN and "Operation not permitted" in check.message


async def test_no_interface_means_no_beacon_and_a_warning(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    runtime = await open_runtime(make_config(discovery={"enabled": True}))
    sent: list[bytes] = []

    async def send(data: bytes, target: tuple[str, int]) -> None:
        sent.append(data)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run_discovery, runtime, beacon_send=send, interface_source=lambda: []))
            await trio.sleep(30)
            (check,) = [c for c in await runtime.health.run_all() if c.name == "discovery"]
            nursery.cancel_scope.cancel()
    finally:
        runtime.db.close()
    assert sent == []
    assert check.status is Status.WARN and "no up IPv4 interface" in check.message


# --- start-up, configuration ----------------------------------------------------------------


async def test_disabled_discovery_shows_as_disabled_and_binds_nothing(appliance: Runtime) -> None:
    status = appliance.board.get("discovery")
    assert status is not None and status.state is ServiceState.DISABLED
    assert appliance.ports["discovery"] == 0  # never bound
    assert appliance.metrics.value("discovery_probes") == 0


async def test_a_taken_port_stops_start_up_with_a_clear_error(make_config: ConfigFactory) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        runtime = await open_runtime(make_config(**discovery_on(), lan={"ports": {"discovery": port}}))
        try:
            with pytest.raises(DiscoveryBindError, match=rf"cannot bind udp 127\.0\.0\.1:{port} .*ss -lunp"):
                await run_discovery(runtime)
        finally:
            runtime.db.close()


# --- the interface reader ----------------------------------------------------------------------


def test_interfaces_are_read_from_the_kernel() -> None:
    found = interfaces()
    lo = [i for i in found if i.loopback]
    assert lo and lo[0].address == "127.0.0.1" and lo[0].up and lo[0].broadcast is None
    assert lo[0].index == socket.if_nametoindex(lo[0].name)
    assert all(not i.loopback for i in beacon_interfaces(found))


def test_ifreq_parsing() -> None:
    ifreq = b"eth0".ljust(16, b"\0") + struct.pack("@H", socket.AF_INET) + b"\0\0" + bytes([10, 1, 2, 3]) + bytes(16)
    assert parse_ifreq_address(ifreq) == "10.1.2.3"
    with pytest.raises(ValueError, match="IPv4"):
        parse_ifreq_address(b"eth0".ljust(16, b"\0") + struct.pack("@H", socket.AF_INET6) + bytes(22))
    with pytest.raises(ValueError, match="short"):
        parse_ifreq_address(b"eth0")


def test_route_source_asks_the_routing_table_without_sending() -> None:
    assert route_source("127.0.0.1") == "127.0.0.1"
    assert route_source("127.9.9.9") == "127.0.0.1"
    assert route_source("not an address") is None
    assert route_source("::1") is None


# --- appliance discover -----------------------------------------------------------------------


def appliance_command() -> list[str]:
    script = Path(sys.executable).parent / "appliance"
    return [str(script)] if script.exists() else [sys.executable, "-m", "appliance"]


async def test_appliance_discover_finds_a_running_box(make_config: ConfigFactory) -> None:
    async with running_box(make_config) as runtime:
        port = runtime.ports["discovery"]
        result = await trio.run_process(
            [*appliance_command(), "discover", "--target", "127.0.0.1", "--no-broadcast", "--port", str(port),
             "--timeout", "1", "--json"], capture_stdout=True, capture_stderr=True, check=False)
        assert result.returncode == 0, result.stderr
        (box,) = json.loads(result.stdout)
        assert box["address"] == "127.0.0.1"
        assert box["appliance_id"] == runtime.appliance_id
        assert box["ports"] == runtime.ports
        assert (box["store_id"], box["signed"]) == (None, False)
        assert await runtime.db.read(list_devices) == []  # a tool is answered, not registered


async def test_appliance_discover_says_when_nobody_answers(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # a port nobody answers on
        result = await trio.run_process(
            [*appliance_command(), "discover", "--target", "127.0.0.1", "--no-broadcast",
             "--port", str(silent.getsockname()[1]), "--timeout", "0.3"],
            capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 1
    assert b"no appliance answered within 0.3 s" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--no-broadcast"], "nothing to probe"),
    (["--target", "box.local"], "not an IPv4 address"),
    (["--timeout", "0"], "--timeout"),
    (["--port", "70000", "--target", "127.0.0.1"], "--port"),
])
def test_appliance_discover_refuses_bad_arguments(args: list[str], message: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from appliance.cli import main

    assert main(["discover", *args]) == 2
    assert message in capsys.readouterr().err


def test_appliance_discover_text_output() -> None:
    from appliance.commands.discover import _text

    line = _text({"address": "10.0.0.2", "name": "Shop", "appliance_id": "box-1", "store_id": None, "signed": False,
                  "firmware": "1.0", "ports": {"admin": 80, "api": 8000}, "replied_from": "10.0.0.9:57854"})
    assert "10.0.0.2  Shop  [box-1]  store: not paired (unsigned)  firmware 1.0" in line
    assert "answered from 10.0.0.9:57854" in line  # the box answered from another address than it names
    assert "ports: admin 80, api 8000" in line


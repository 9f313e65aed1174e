"""The device registry: its queries on a real SQLite file, and adoption through the admin
listener (real hypercorn) by the JSON API and by the homepage's form."""

from __future__ import annotations

import sqlite3
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import assume, given
from hypothesis import strategies as st

from appliance.config import DeviceDecl
from appliance.services.assembly import service_specs
from appliance.services.board import ServiceState
from appliance.services.runtime import Runtime
from appliance.services.web.common import FormError, parse_form
from appliance.storage import Database
from appliance.storage.devices import (
    MAX_PENDING,
    MAX_PENDING_PER_ADDRESS,
    AdoptionState,
    DeclaredInConfig,
    DeviceSource,
    UnknownDevice,
    get_device,
    list_adopted,
    list_devices,
    prune_pending,
    record_probe,
    set_state,
    sync_declared,
)
from appliance.supervisor import open_runtime, supervise_all

from .conftest import ConfigFactory

TOKEN = "test-admin-token-0123456789"  # conftest's admin token
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# --- the queries, on a real database file ---------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database.open_sync(tmp_path / "a.db")
    yield database
    database.close()


def probe(db: Database, device_id: str = "pos-1", *, now: float = 100.0, address: str = "10.0.0.5",
          port: int = 8081, name: str = "Till", kind: str = "pos", signed: bool = False) -> Any:
    return db.write_sync(partial(record_probe, device_id=device_id, kind=kind, name=name, address=address,
                                 port=port, now=now, signed=signed))


def test_a_probe_creates_a_pending_device_then_refreshes_it(db: Database) -> None:
    first = probe(db, now=100.0)
    assert (first.created, first.changed) == (True, True)
    assert first.device.state is AdoptionState.PENDING and first.device.source is DeviceSource.DISCOVERY
    again = probe(db, now=160.0)
    assert (again.created, again.changed) == (False, False)  # only last_seen moved
    # Anyone can send an unsigned probe with this id: it moves nothing, and says so.
    spoofed = probe(db, now=200.0, address="10.0.0.66", name="Evil")
    assert (spoofed.created, spoofed.changed, spoofed.ignored) == (False, False, True)
    moved = probe(db, now=210.0, address="10.0.0.6", signed=True)
    assert (moved.created, moved.changed, moved.ignored) == (False, True, False)
    device = db.read_sync(partial(get_device, device_id="pos-1"))
    assert device is not None
    assert (device.address, device.name, device.first_seen, device.last_seen) == ("10.0.0.6", "Till", 100.0, 210.0)


def test_adoption_survives_probes_and_only_adopted_devices_are_listed_as_such(db: Database) -> None:
    probe(db, "pos-1")
    probe(db, "kds-1", kind="kds")
    probe(db, "bad-1")
    device, changed = db.write_sync(partial(set_state, device_id="pos-1", state=AdoptionState.ADOPTED, now=150.0))
    assert changed and device.state is AdoptionState.ADOPTED and device.state_changed == 150.0
    assert db.write_sync(partial(set_state, device_id="pos-1", state=AdoptionState.ADOPTED, now=151.0))[1] is False
    db.write_sync(partial(set_state, device_id="bad-1", state=AdoptionState.REJECTED, now=150.0))
    probe(db, "pos-1", now=300.0, address="10.0.0.9", signed=True)  # a new DHCP lease, said with its key
    probe(db, "pos-1", now=301.0, address="10.0.0.66")  # a spoofed probe
    probe(db, "bad-1", now=300.0)
    adopted = db.read_sync(list_adopted)
    assert [(d.id, d.address) for d in adopted] == [("pos-1", "10.0.0.9")]
    assert [(d.id, str(d.state)) for d in db.read_sync(list_devices)] == [
        ("pos-1", "adopted"), ("kds-1", "pending"), ("bad-1", "rejected")]
    with pytest.raises(UnknownDevice, match="nope"):
        db.write_sync(partial(set_state, device_id="nope", state=AdoptionState.ADOPTED, now=1.0))


def test_pending_devices_are_bounded_per_address_and_in_all_and_never_evicted(db: Database) -> None:
    probe(db, "keep", now=0.0)
    db.write_sync(partial(set_state, device_id="keep", state=AdoptionState.ADOPTED, now=0.0))
    probe(db, "genuine", now=0.5, address="10.0.0.200")
    refused = [probe(db, f"same-{i}", address="10.0.0.9", now=1.0).refused for i in range(MAX_PENDING_PER_ADDRESS + 2)]
    assert refused == [None] * MAX_PENDING_PER_ADDRESS + ["address_full"] * 2
    for i in range(MAX_PENDING * 2):
        probe(db, f"dev-{i:03d}", now=float(i + 2), address=f"10.1.{i // 200}.{i % 200}")
    result = probe(db, "newcomer", now=10_000.0, address="10.2.0.1")
    assert (result.refused, result.device, result.created) == ("full", None, False)
    ids = {d.id for d in db.read_sync(list_devices)}
    assert len(ids) == MAX_PENDING + 1 and {"keep", "genuine", "same-0"} <= ids and "newcomer" not in ids


def test_silent_pending_devices_are_pruned(db: Database) -> None:
    probe(db, "old", now=0.0)
    probe(db, "old-adopted", now=0.0)
    db.write_sync(partial(set_state, device_id="old-adopted", state=AdoptionState.ADOPTED, now=0.0))
    probe(db, "recent", now=900.0)
    assert db.write_sync(partial(prune_pending, now=1000.0, retention_s=500.0)) == ["old"]
    assert {d.id for d in db.read_sync(list_devices)} == {"old-adopted", "recent"}


def test_declared_devices_are_adopted_and_the_config_stays_their_source_of_truth(db: Database) -> None:
    probe(db, "printer-1", kind="printer", address="10.0.0.7", name="From probe")
    declared = [DeviceDecl(id="printer-1", kind="printer", address="10.0.0.50", port=9100),
                DeviceDecl(id="kds-2", kind="kds", address="10.0.0.51", name="Kitchen")]
    assert db.write_sync(partial(sync_declared, declared=declared, now=500.0)) is True
    assert db.write_sync(partial(sync_declared, declared=declared, now=600.0)) is False  # nothing changed
    printer = db.read_sync(partial(get_device, device_id="printer-1"))
    assert printer is not None
    assert (printer.state, printer.source, printer.address, printer.port, printer.name) == (
        AdoptionState.ADOPTED, DeviceSource.CONFIG, "10.0.0.50", 9100, "From probe")
    kds = db.read_sync(partial(get_device, device_id="kds-2"))
    assert kds is not None and kds.last_seen is None and kds.state is AdoptionState.ADOPTED
    # A probe refreshes last_seen only: the file says where the device is.
    result = probe(db, "printer-1", kind="printer", address="10.0.0.99", now=700.0)
    assert result.changed is False and result.device.address == "10.0.0.50" and result.device.last_seen == 700.0
    with pytest.raises(DeclaredInConfig, match=r"\[\[devices\]\]"):
        db.write_sync(partial(set_state, device_id="kds-2", state=AdoptionState.REJECTED, now=1.0))
    # Removed from the file: removed from the registry.
    assert db.write_sync(partial(sync_declared, declared=declared[:1], now=800.0)) is True
    assert db.read_sync(partial(get_device, device_id="kds-2")) is None


def test_the_schema_refuses_bad_rows(db: Database) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        db.write_sync(lambda c: c.execute(
            "INSERT INTO devices VALUES ('x', 'k', '', '10.0.0.1', 8081, 'maybe', 'discovery', 0, 0, 0, NULL, 0)"))
    with pytest.raises(sqlite3.IntegrityError):
        db.write_sync(lambda c: c.execute(
            "INSERT INTO devices VALUES ('x', 'k', '', '10.0.0.1', 0, 'pending', 'discovery', 0, 0, 0, NULL, 0)"))


# --- through the admin listener -------------------------------------------------------------


@asynccontextmanager
async def box(make_config: ConfigFactory, **sections: Any) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    runtime = await open_runtime(make_config(**sections))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: supervise_all(runtime, service_specs(runtime),
                                                                  task_status=task_status))
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{runtime.ports['admin']}",
                                         follow_redirects=False) as client:
                yield runtime, client
            runtime.stopping.set()
    finally:
        runtime.db.close()


async def seen(runtime: Runtime, device_id: str, **fields: Any) -> None:
    """A device as a probe would register it (the discovery service is tested elsewhere)."""
    args = {"kind": "pos", "name": "Till", "address": "10.0.0.5", "port": 8081, "now": 1000.0, **fields}
    await runtime.db.write(partial(record_probe, device_id=device_id, **args))


async def state_of(runtime: Runtime, device_id: str) -> AdoptionState | None:
    device = await runtime.db.read(partial(get_device, device_id=device_id))
    return None if device is None else device.state


async def test_adopt_and_reject_through_the_api(make_config: ConfigFactory) -> None:
    async with box(make_config) as (runtime, client):
        await seen(runtime, "pos-1")
        listed = (await client.get("/api/devices")).json()["devices"]
        assert [(d["id"], d["state"], d["address"]) for d in listed] == [("pos-1", "pending", "10.0.0.5")]

        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = await client.post("/api/devices/pos-1/adopt", headers=headers)
            assert r.status_code == 401 and "admin bearer token" in r.json()["error"]
        assert await state_of(runtime, "pos-1") is AdoptionState.PENDING

        version = runtime.device_changes.version
        r = await client.post("/api/devices/pos-1/adopt", headers=AUTH)
        assert r.status_code == 200
        assert (r.json()["device"]["state"], r.json()["changed"]) == ("adopted", True)
        assert runtime.device_changes.version == version + 1  # the dispatcher is told
        assert [d.id for d in await runtime.db.read(list_adopted)] == ["pos-1"]
        r = await client.post("/api/devices/pos-1/adopt", headers=AUTH)
        assert r.json()["changed"] is False and runtime.device_changes.version == version + 1

        r = await client.post("/api/devices/pos-1/reject", headers=AUTH)
        assert r.status_code == 200 and r.json()["device"]["state"] == "rejected"
        assert await runtime.db.read(list_adopted) == []

        assert (await client.post("/api/devices/nope/adopt", headers=AUTH)).status_code == 404
        assert (await client.post("/api/devices/pos-1/forget", headers=AUTH)).status_code == 404
        assert (await client.get("/api/devices/pos-1/adopt")).status_code == 405
        assert (await client.get("/api/devices/pos-1")).json()["device"]["state"] == "rejected"
        assert (await client.get("/api/devices/nope")).status_code == 404
        status = (await client.get("/api/status")).json()
        assert status["devices"] == {"pending": 0, "adopted": 0, "rejected": 1}


async def test_the_homepage_lists_devices_and_its_buttons_work_with_the_token(make_config: ConfigFactory) -> None:
    async with box(make_config) as (runtime, client):
        assert "No device yet" in (await client.get("/")).text
        await seen(runtime, "pos-1", name="Till <1>")
        page = (await client.get("/")).text
        assert "Till &lt;1&gt;" in page  # escaped
        assert "came from 10.0.0.5:8081" in page  # where the probe came from
        assert "<form method=post action='/devices/action'" in page
        assert "value='adopt:pos-1'" in page and "value='reject:pos-1'" in page
        assert "type=password name=token" in page
        assert page.count("<script") == page.count("<section id=live")  # only live updates use a script

        form = {"Content-Type": "application/x-www-form-urlencoded"}
        for body in ("action=adopt%3Apos-1", "token=wrong&action=adopt%3Apos-1", "token=&action=adopt%3Apos-1"):
            r = await client.post("/devices/action", content=body, headers=form)
            assert r.status_code == 401 and "admin token is missing or wrong" in r.text
            assert "text/html" in r.headers["content-type"]
        assert await state_of(runtime, "pos-1") is AdoptionState.PENDING

        version = runtime.device_changes.version
        r = await client.post("/devices/action", data={"token": TOKEN, "action": "adopt:pos-1"})
        assert r.status_code == 303 and r.headers["location"] == "/#devices"
        assert await state_of(runtime, "pos-1") is AdoptionState.ADOPTED
        assert runtime.device_changes.version == version + 1
        page = (await client.get("/")).text
        assert "value='adopt:pos-1'" not in page and "value='revoke:pos-1'" in page

        bad = [
            ({"token": TOKEN, "action": "destroy:pos-1"}, 400, "Unknown action"),
            ({"token": TOKEN, "action": "adopt:"}, 400, "Unknown action"),
            ({"token": TOKEN, "action": "adopt:ghost"}, 404, "no device"),
        ]
        for data, code, text in bad:
            r = await client.post("/devices/action", data=data)
            assert r.status_code == code and text in r.text
        r = await client.post("/devices/action", content=f"token={TOKEN}&token=x&action=reject%3Apos-1",
                              headers=form)
        assert r.status_code == 400 and "appears twice" in r.text
        r = await client.post("/devices/action", json={"token": TOKEN, "action": "reject:pos-1"})
        assert r.status_code == 415
        r = await client.post("/devices/action", content="token=" + "x" * 5000, headers=form)
        assert r.status_code == 413
        assert await state_of(runtime, "pos-1") is AdoptionState.ADOPTED  # none of that changed anything


async def test_declared_devices_are_adopted_at_start_with_discovery_off(make_config: ConfigFactory) -> None:
    devices = [{"id": "printer-1", "kind": "printer", "address": "192.168.1.50", "port": 9100}]
    async with box(make_config, devices=devices) as (runtime, client):
        assert runtime.board.get("discovery").state is ServiceState.DISABLED  # type: ignore[union-attr]
        assert runtime.board.get("devices").state is ServiceState.RUNNING  # type: ignore[union-attr]
        (printer,) = await runtime.db.read(list_adopted)
        assert (printer.id, printer.address, printer.port, printer.source) == (
            "printer-1", "192.168.1.50", 9100, DeviceSource.CONFIG)
        assert runtime.device_changes.version >= 1
        r = await client.post("/api/devices/printer-1/reject", headers=AUTH)
        assert r.status_code == 409 and "declared in the configuration" in r.json()["error"]
        page = (await client.get("/")).text
        assert "declared in config" in page and "Discovery is off" in page
    # Next start without it: it is gone.
    async with box(make_config) as (runtime, _client):
        assert await runtime.db.read(list_devices) == []


@given(st.binary(max_size=400))
def test_any_form_body_parses_or_raises_the_form_error(body: bytes) -> None:
    try:
        form = parse_form(body)
    except FormError as exc:
        assert exc.status == 400
    else:
        assert len(form) <= 8


@given(st.dictionaries(st.sampled_from(["token", "action", "x"]), st.text(max_size=40)))
def test_form_round_trip(fields: dict[str, str]) -> None:
    body = urllib.parse.urlencode(fields).encode()
    assume(body)  # an empty body is not a valid form (strict parsing)
    assert parse_form(body) == fields

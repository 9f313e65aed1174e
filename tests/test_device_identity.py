"""The attacks of the shop's guest Wi-Fi, against the whole appliance on loopback.

Every service runs (the assembly), on real sockets: discovery on UDP, the store API,
provisioning and admin listeners under hypercorn, the dispatcher connecting to device
simulators. Loopback has the whole of 127.0.0.0/8, so an attacker gets its own address.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import httpx
import trio

from appliance.devkit.device import DeviceSimulator, run_device_simulator
from appliance.devkit.device_client import DeviceAuth, Enrolled, enroll
from appliance.protocol import discovery as wire
from appliance.protocol import identity as idp
from appliance.protocol import sigcheck
from appliance.services.discovery import Limits, run_discovery
from appliance.services.runtime import Runtime
from appliance.storage.devices import MAX_PENDING, MAX_PENDING_PER_ADDRESS, AdoptionState, get_device, list_devices
from appliance.supervisor import open_runtime
from tests.test_h11_serving import read_answers

from .conftest import ConfigFactory, device_key
from .conftest import running_box as box_with

DEADLINE_S = 10.0
TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def url(rt: Runtime, role: str) -> str:
    return f"http://127.0.0.1:{rt.ports[role]}"


async def until(predicate: Callable[[], Any], what: str) -> None:
    with trio.fail_after(DEADLINE_S):
        while not predicate():  # noqa: ASYNC110  # the simulators' memory, counters: nothing to wait on
            await trio.sleep(0.02)  # the simulators' memory: nothing to wait on
    assert predicate(), what


@asynccontextmanager
async def box(make_config: ConfigFactory, **sections: Any) -> AsyncIterator[Runtime]:
    discovery = {"discovery": {"enabled": True, "broadcast": ["127.0.0.1"]}}
    async with box_with(make_config(**{**discovery, **sections})) as runtime:
        yield runtime


async def serve(nursery: trio.Nursery, sim: DeviceSimulator, host: str = "127.0.0.1") -> int:
    port: int = await nursery.start(partial(run_device_simulator, sim, port=0, bind=host))
    return port


async def enroll_and_adopt(rt: Runtime, sim: DeviceSimulator, port: int, kind: str = "kds") -> Enrolled:
    """The device enrolls on 8003; the manager compares the code and adopts it (admin API)."""
    async with httpx.AsyncClient(base_url=url(rt, "provisioning")) as client:
        enrolled = await enroll(client, device_id=sim.device_id, kind=kind, name=sim.device_id, port=port)
    sim.key = enrolled.key
    async with httpx.AsyncClient(base_url=url(rt, "admin")) as admin:
        listed = (await admin.get(f"/api/devices/{sim.device_id}")).json()["device"]
        assert listed["enrollment"]["code"] == enrolled.code  # the homepage and the device agree
        answer = await admin.post(f"/api/devices/{sim.device_id}/adopt", headers=ADMIN, json={"code": enrolled.code})
        assert answer.status_code == 200, answer.text
    return enrolled


def order(order_id: str, device_id: str) -> dict[str, Any]:
    return {"id": order_id, "device_id": device_id, "currency": "EUR", "total_cents": 450,
            "lines": [{"sku": "tea", "name": "Tea", "qty": 1, "unit_price_cents": 450}]}


def probe(device_id: str, port: int, *, key: bytes | None = None, ts: float | None = None) -> bytes:
    message = wire.Probe(device_id=device_id, kind="kds", name="Kitchen", port=port, nonce=secrets.token_hex(8))
    if key is None:
        return wire.encode(message)
    return wire.sign(attrs.evolve(message, ts=time.time() if ts is None else ts), key)


async def send_from(host: str, data: bytes, port: int) -> None:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind((host, 0))
        await sock.sendto(data, ("127.0.0.1", port))


async def test_a_spoofed_probe_moves_nothing_and_the_next_order_reaches_the_real_device(
        make_config: ConfigFactory) -> None:
    kds = DeviceSimulator(device_id="kds-1", kind="kds")
    pos = DeviceSimulator(device_id="pos-1", kind="pos")
    attacker = DeviceSimulator(device_id="kds-1", kind="kds", impostor=True)
    async with trio.open_nursery() as sims, box(make_config) as rt:
        kds_port, pos_port = await serve(sims, kds), await serve(sims, pos)
        trap = await serve(sims, attacker, host="127.0.0.66")
        await enroll_and_adopt(rt, kds, kds_port)
        pos_key = (await enroll_and_adopt(rt, pos, pos_port, kind="pos")).key
        await until(lambda: kds.connections and pos.connections, "the box connects to both devices")

        discovery = rt.ports["discovery"]
        await send_from("127.0.0.66", probe("kds-1", trap), discovery)  # the attack: unsigned
        await send_from("127.0.0.66", probe("kds-1", trap, key=secrets.token_bytes(32)), discovery)  # a wrong key
        await until(lambda: rt.metrics.value("discovery_moves_refused", reason="unsigned") == 1
                    and rt.metrics.value("discovery_moves_refused", reason="bad_signature") == 1,
                    "both probes counted and ignored")
        device = await rt.db.read(partial(get_device, device_id="kds-1"))
        assert device is not None and (device.address, device.port) == ("127.0.0.1", kds_port)

        async with httpx.AsyncClient(base_url=url(rt, "api"), auth=DeviceAuth("pos-1", pos_key)) as till:
            answer = await till.post("/v1/orders", json=order("o-1", "pos-1"))
            assert answer.status_code == 201, answer.text
        await until(lambda: [a.body["order"]["id"] for a in kds.accepted] == ["o-1"], "the order reaches kds-1")
        assert attacker.connections == 0 and not attacker.accepted

        # The real device, moved to another port by DHCP or a restart, says so with its key.
        moved = DeviceSimulator(device_id="kds-1", kind="kds", key=kds.key)
        new_port = await serve(sims, moved)
        assert kds.key is not None
        await send_from("127.0.0.1", probe("kds-1", new_port, key=kds.key), discovery)
        await until(lambda: moved.connections, "a signed probe moves the device")
        replayed = probe("kds-1", kds_port, key=kds.key, ts=time.time() - 120)  # an old signed probe
        await send_from("127.0.0.66", replayed, discovery)
        await until(lambda: rt.metrics.value("discovery_moves_refused", reason="bad_signature") == 2, "stale refused")
        device = await rt.db.read(partial(get_device, device_id="kds-1"))
        assert device is not None and device.port == new_port
        sims.cancel_scope.cancel()


async def test_an_impostor_gets_no_command_and_health_names_it(make_config: ConfigFactory) -> None:
    impostor = DeviceSimulator(device_id="kds-1", kind="kds", impostor=True)
    # A genuine device with its key, and a box configured with the wrong one: it refuses the box.
    careful = DeviceSimulator(device_id="printer-1", kind="printer", key=device_key("printer-1"))
    async with trio.open_nursery() as sims:
        port, careful_port = await serve(sims, impostor), await serve(sims, careful)
        devices = [{"id": "kds-1", "kind": "kds", "address": "127.0.0.1", "port": port,
                    "key": device_key("kds-1").hex()},
                   {"id": "printer-1", "kind": "printer", "address": "127.0.0.1", "port": careful_port,
                    "key": secrets.token_hex(32)}]
        async with box(make_config, devices=devices) as rt, httpx.AsyncClient() as client:
            for device_id in ("kds-1", "printer-1"):
                answer = await client.post(f"{url(rt, 'api')}/v1/devices/{device_id}/commands", headers=ADMIN,
                                           json={"kind": "order.created", "body": {"customer": "Ada"}})
                assert answer.status_code == 201
            await until(lambda: impostor.connections >= 1 and careful.refused_boxes >= 1, "both links tried")
            health = (await client.get(f"{url(rt, 'ops')}/health")).json()
            checks = {c["name"]: c for c in health["checks"]}
            check = checks["device.kds-1.channel"]
            assert check["message"].startswith(f"device kds-1: failed authentication at 127.0.0.1:{port} "
                                               "(impostor or wrong key)"), check
            assert check["status"] == "fail" and "enroll again" in check["fix"]
            assert "failed authentication" in checks["device.printer-1.channel"]["message"]
            assert not impostor.accepted and not careful.accepted
            assert rt.metrics.value("device_commands_sent", device="kds-1") == 0
        sims.cancel_scope.cancel()


async def test_8000_forged_probes_from_200_addresses_leave_a_pending_device_in_place(
        make_config: ConfigFactory) -> None:
    # The reply rate limits are lifted so that every forged probe reaches the registry.
    runtime = await open_runtime(make_config(discovery={"enabled": True, "broadcast": ["127.0.0.1"]}))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run_discovery, runtime, limits=Limits(rate_per_s=1e6, burst=1e6,
                                                                              global_rate_per_s=1e6,
                                                                              global_burst=1e6)))
            port = runtime.ports["discovery"]
            seen = runtime.device_changes.version
            await send_from("127.0.0.1", probe("pos-genuine", 8081), port)
            with trio.fail_after(DEADLINE_S):
                await runtime.device_changes.wait(seen)
            for n in range(MAX_PENDING_PER_ADDRESS + 3):  # one address alone: a few, then refused
                await send_from("127.0.0.9", probe(f"one-address-{n}", 8081), port)
            await until(lambda: runtime.metrics.value("discovery_pending_refused", scope="address_full") == 3,
                        "one address holds at most a few pending places")
            socks = []
            for i in range(200):
                sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                await sock.bind((f"127.0.{1 + i // 250}.{1 + i % 250}", 0))
                socks.append(sock)
            # 8,000 forged probes at least, and on until the list is full: on a loaded machine
            # the registry writer drops (and counts) what its queue cannot hold.
            n = 0
            with trio.fail_after(60):
                while n < 8000 or runtime.metrics.value("discovery_pending_refused", scope="full") == 0:
                    await socks[n % 200].sendto(probe(f"forged-{n}", 8081), ("127.0.0.1", port))
                    n += 1
                    if n % 64 == 0:
                        await trio.sleep(0.002)  # let the registry writer keep up
            for sock in socks:
                sock.close()
            nursery.cancel_scope.cancel()
        devices = await runtime.db.read(list_devices)
        pending = [d for d in devices if d.state is AdoptionState.PENDING]
        assert "pos-genuine" in {d.id for d in pending}
        assert len(pending) == MAX_PENDING
        per_address: dict[str, int] = {}
        for d in pending:
            per_address[d.address] = per_address.get(d.address, 0) + 1
        assert max(per_address.values()) <= MAX_PENDING_PER_ADDRESS
    finally:
        runtime.db.close()


async def test_signed_requests_only_for_the_signer_and_never_twice(make_config: ConfigFactory,
                                                                   sig_check: sigcheck.Check) -> None:
    keys = {d: device_key(d) for d in ("pos-a", "pos-b")}
    devices = [{"id": d, "kind": "pos", "address": "127.0.0.1", "port": 9, "key": k.hex()} for d, k in keys.items()]
    async with box(make_config, devices=devices) as rt:
        assert rt.keys.check is sig_check
        api = url(rt, "api")
        async with httpx.AsyncClient(base_url=api, auth=DeviceAuth("pos-a", keys["pos-a"])) as a:
            sale = {"id": "s-1", "device_id": "pos-b", "currency": "EUR", "total_cents": 100,
                    "lines": [{"sku": "tea", "qty": 1, "unit_price_cents": 100}]}
            answer = await a.post("/v1/sales", json=sale)
            assert answer.status_code == 403 and "may not act for 'pos-b'" in answer.json()["error"]
            assert (await a.post("/v1/sales", json={**sale, "device_id": "pos-a"})).status_code == 201
            assert (await a.get("/v1/sales/s-1")).status_code == 200
            assert (await a.get("/v1/devices/pos-b/commands")).status_code == 403
            assert (await a.get("/v1/devices/pos-a/commands")).status_code == 200
            # Back-office routes stay the admin's.
            assert (await a.get("/v1/orders")).status_code == 401
            assert (await a.post("/v1/devices/pos-a/commands", json={"kind": "ping", "body": {}})).status_code == 401

        async with httpx.AsyncClient(base_url=api) as raw:
            body = b'{"id":"s-2","device_id":"pos-a","currency":"EUR","total_cents":1,"lines":[]}'
            headers = idp.sign_request(keys["pos-a"], device_id="pos-a", method="POST", path="/v1/sales", query="",
                                       body=body, created=int(time.time()), nonce=secrets.token_hex(16))
            first = await raw.post("/v1/sales", content=body, headers=headers)
            assert first.status_code in (201, 422), first.text
            replay = await raw.post("/v1/sales", content=body, headers=headers)
            assert replay.status_code == 401 and "used already" in replay.json()["error"]
            stale = idp.sign_request(keys["pos-a"], device_id="pos-a", method="GET", path="/v1/products", query="",
                                     body=b"", created=int(time.time()) - 300, nonce=secrets.token_hex(16))
            answer = await raw.get("/v1/products", headers=stale)
            assert answer.status_code == 401 and "within 30 s" in answer.json()["error"]
            tampered = dict(headers, **{"Signature-Input": headers["Signature-Input"].replace("s-2", "s-3")})
            assert (await raw.post("/v1/sales", content=body.replace(b"s-2", b"s-3"),
                                   headers=tampered)).status_code == 401
            wrong = idp.sign_request(secrets.token_bytes(32), device_id="pos-a", method="GET", path="/v1/products",
                                     query="", body=b"", created=int(time.time()), nonce=secrets.token_hex(16))
            assert (await raw.get("/v1/products", headers=wrong)).status_code == 401
            assert (await raw.get("/v1/products")).status_code == 401
        assert rt.metrics.value("device_auth_refused", reason="replayed") == 1


async def test_new_devices_keys_are_read_in_trios_thread(make_config: ConfigFactory) -> None:
    """A crowd of devices the box has not seen since it started: each one's key is one row
    read right in trio's thread (Database.read_small), none in a worker thread, so their
    reads cannot queue for the worker threads' readers (behind which every product read
    after them went to a thread too, for as long as the crowd lasted)."""
    keys = {f"pos-{n}": device_key(f"pos-{n}") for n in range(20)}
    devices = [{"id": d, "kind": "pos", "address": "127.0.0.1", "port": 9, "key": k.hex()} for d, k in keys.items()]
    async with box(make_config, devices=devices) as rt:
        in_threads: list[object] = []
        read = rt.db.read

        async def counting_read(fn: Any) -> Any:
            in_threads.append(getattr(fn, "func", fn))
            return await read(fn)

        rt.db.read = counting_read  # type: ignore[method-assign]
        async with httpx.AsyncClient(base_url=url(rt, "api")) as client:

            async def get(device_id: str) -> None:
                headers = idp.sign_request(keys[device_id], device_id=device_id, method="GET",
                                           path="/v1/products/SKU-1", query="", body=b"", created=int(time.time()),
                                           nonce=secrets.token_hex(16))
                answer = await client.get("/v1/products/SKU-1", headers=headers)
                assert answer.status_code == 503 and "no copy of the store's catalog" in answer.text, answer.text

            async with trio.open_nursery() as nursery:
                for device_id in keys:
                    nursery.start_soon(get, device_id)
        assert get_device not in in_threads and in_threads, in_threads  # (the catalog's state was: 503)
        assert all(rt.keys.cached(device_id) is not None for device_id in keys)


async def raw_exchange(port: int, head: bytes) -> tuple[int, bytes]:
    """One request's head as raw bytes on a fresh connection: the answer's status and body."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(head)
        (answer,) = await read_answers(stream, 1)
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split(b" ")[1]), rest.partition(b"\r\n\r\n")[2]


async def test_signature_headers_are_read_as_received_and_hostile_bytes_get_a_401(
        make_config: ConfigFactory, sig_check: sigcheck.Check) -> None:
    """The box matches the signature headers on the bytes it received: any byte an HTTP
    parser lets through in a value (obs-text, a lone high byte, a non-breaking space after
    a valid value) is a 401 "malformed" with its line, never a 500; blanks around a valid
    value are an HTTP parser's to drop and pass; and the box serves on after each."""
    key = device_key("pos-a")
    devices = [{"id": "pos-a", "kind": "pos", "address": "127.0.0.1", "port": 9, "key": key.hex()}]
    async with box(make_config, devices=devices) as rt:
        assert rt.keys.check is sig_check
        port = rt.ports["api"]

        def head(**replace: bytes) -> bytes:
            signed = idp.sign_request(key, device_id="pos-a", method="GET", path="/v1/products/SKU-1", query="",
                                      body=b"", created=int(time.time()), nonce=secrets.token_hex(16))
            fields = {k.lower(): v.encode() for k, v in signed.items()} | replace
            lines = b"".join(b"%s: %s\r\n" % (name.encode(), value) for name, value in fields.items())
            return b"GET /v1/products/SKU-1 HTTP/1.1\r\nhost: 127.0.0.1\r\n" + lines + b"\r\n"

        good = head()
        valid_input = good.split(b"signature-input: ")[1].split(b"\r\n")[0]
        valid_signature = good.split(b"signature: ")[1].split(b"\r\n")[0]
        assert (await raw_exchange(port, good))[0] == 503  # signed and checked: the replica is empty
        hostile = [
            {"signature-input": valid_input + b"\xa0"},
            {"signature-input": valid_input.replace(b"pos-a", b"pos-\xe9")},
            {"signature": valid_signature[:-2] + b"\xff:"},
            {"signature": b"chub=:" + b"\x80" * 44 + b":"},
            {"content-digest": b"sha-256=:\xc3\xa9:"},
            {"signature-input": b"x" * 300},
        ]
        for replace in hostile:
            status, body = await raw_exchange(port, head(**replace))
            assert status == 401, (replace, status, body)
            assert b"must be" in body or b"longer than" in body, body
        # Blanks around a value: dropped by the HTTP parser, the signature still checks.
        fresh = head()
        padded = fresh.replace(b"signature-input: ", b"signature-input: \t").replace(b"\r\nsignature:",
                                                                                  b"\t \r\nsignature:")
        assert padded != fresh and (await raw_exchange(port, padded))[0] == 503
        assert rt.metrics.value("device_auth_refused", reason="malformed") == len(hostile)


async def test_revoking_a_device_shuts_it_out_at_once(make_config: ConfigFactory) -> None:
    kds = DeviceSimulator(device_id="kds-1", kind="kds")
    async with trio.open_nursery() as sims, box(make_config) as rt:
        port = await serve(sims, kds)
        enrolled = await enroll_and_adopt(rt, kds, port)
        await until(lambda: kds.connections, "the box connects")
        revoked = rt.keys.revoked("kds-1")
        async with httpx.AsyncClient(base_url=url(rt, "api"), auth=DeviceAuth("kds-1", enrolled.key)) as device:
            assert (await device.get("/v1/devices/kds-1/commands")).status_code == 200
            async with httpx.AsyncClient(base_url=url(rt, "admin")) as admin:
                assert (await admin.post("/api/devices/kds-1/revoke", headers=ADMIN)).status_code == 200
            assert revoked.is_set()  # whoever held a stream for it was told at once
            assert (await device.get("/v1/devices/kds-1/commands")).status_code == 401
        await until(lambda: "kds-1" not in _links(rt), "the link is stopped")
        sims.cancel_scope.cancel()


async def test_commands_for_a_device_stop_as_soon_as_it_is_revoked(make_config: ConfigFactory) -> None:
    # The command route takes an adopted device's state from the key ring's cache: the
    # revoke must reach it at once, not after some expiry.
    kds = DeviceSimulator(device_id="kds-1", kind="kds")
    async with trio.open_nursery() as sims, box(make_config) as rt:
        port = await serve(sims, kds)
        await enroll_and_adopt(rt, kds, port)
        async with httpx.AsyncClient(base_url=url(rt, "api"), headers=ADMIN) as api, \
                httpx.AsyncClient(base_url=url(rt, "admin")) as admin:
            for n in range(3):  # the first read remembers it; the next two are served from the cache
                answer = await api.post("/v1/devices/kds-1/commands", json={"kind": "print", "body": {"n": n}})
                assert answer.status_code == 201, answer.text
            assert rt.keys.cached("kds-1") is not None
            assert (await admin.post("/api/devices/kds-1/revoke", headers=ADMIN)).status_code == 200
            refused = await api.post("/v1/devices/kds-1/commands", json={"kind": "print", "body": {}})
            assert refused.status_code == 409 and "rejected" in refused.json()["error"]
        sims.cancel_scope.cancel()


def _links(rt: Runtime) -> set[str]:
    return set(rt.device_links.links)


async def test_a_reset_device_enrolling_again_changes_nothing_until_accepted(make_config: ConfigFactory) -> None:
    kds = DeviceSimulator(device_id="kds-1", kind="kds")
    async with trio.open_nursery() as sims, box(make_config) as rt:
        port = await serve(sims, kds)
        first = await enroll_and_adopt(rt, kds, port)
        async with httpx.AsyncClient(base_url=url(rt, "provisioning")) as client:
            again = await enroll(client, device_id="kds-1", kind="kds", name="Kitchen", port=port)
        assert (again.replaces and again.code != first.code) or again.key != first.key
        async with httpx.AsyncClient(base_url=url(rt, "admin")) as admin:
            page = (await admin.get("/")).text
            assert "wants to replace device kds-1" in page and f"{again.code[:3]}&nbsp;{again.code[3:]}" in page
            device = await rt.db.read(partial(get_device, device_id="kds-1"))
            assert device is not None and device.public_key == first.public_key.hex()  # unchanged
            # A stale page's code (another enrollment since) adopts nothing.
            stale = await admin.post("/api/devices/kds-1/adopt", headers=ADMIN, json={"code": first.code})
            assert stale.status_code == 409 and "enrolled again" in stale.json()["error"]
            assert (await admin.post("/api/devices/kds-1/adopt", headers=ADMIN)).status_code == 409
            form = await admin.post("/devices/action", data={"token": TOKEN, "action": f"adopt@{again.code}:kds-1"})
            assert form.status_code == 303
        device = await rt.db.read(partial(get_device, device_id="kds-1"))
        assert device is not None and device.public_key == again.public_key.hex()
        sims.cancel_scope.cancel()

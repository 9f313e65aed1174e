"""Online orders end to end: the real SDK sends to the AMQP peer (wss, TLS verified), a
whole appliance receives in peek-lock and pushes to real device simulators on loopback.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import attrs
import httpx
import trio
from azure.servicebus import ServiceBusMessage

from appliance.config import Config
from appliance.devkit.cloud_orders import OrderMessage
from appliance.devkit.device import DeviceSimulator, run_device_simulator
from appliance.devkit.orders_sender import OrderSender
from appliance.services.assembly import service_specs
from appliance.services.runtime import Runtime
from appliance.services.servicebus import LinkOptions
from appliance.supervisor import open_runtime, supervise_all
from tests import test_servicebus_link
from tests.amqp import fixtures
from tests.amqp.fixtures import AmqpServer
from tests.conftest import device_key

amqp_server = fixtures.amqp_server
queue_name = fixtures.queue_name

DEADLINE_S = 40.0
T = TypeVar("T")
AUTH = {"Authorization": "Bearer test-admin-token-0123456789"}


def order(number: int, **extra: Any) -> OrderMessage:
    body = {"order_id": f"web-{number:06d}", "channel": "click_and_collect", "created_at": "2025-03-01T09:30:00Z",
            "customer": {"name": f"Customer {number}"}, "currency": "EUR", "total_cents": 698,
            "lines": [{"sku": "SKU-000007", "name": "Croissant", "qty": 2, "unit_price_cents": 349}], **extra}
    return OrderMessage(order_id=body["order_id"], body=body)


def orders_section(server: AmqpServer, queue: str, **extra: Any) -> dict[str, Any]:
    return {"enabled": True, "namespace": server.namespace, "queue": queue, "sas_key_name": server.sas_key_name,
            "sas_key": server.sas_key, "testing": {"endpoint": server.endpoint}, "ca_file": server.ca_file,
            "max_wait_s": 1.0,
            **extra}


def sender_for(server: AmqpServer, queue: str) -> OrderSender:
    return OrderSender(LinkOptions(namespace=server.namespace, queue=queue, sas_key_name=server.sas_key_name,
                                   sas_key=server.sas_key, endpoint=server.endpoint, ca_file=server.ca_file,
                                   retry_total=0, socket_timeout_s=fixtures.SOCKET_TIMEOUT_S))


@attrs.define
class Shop:
    runtime: Runtime
    kds: DeviceSimulator
    printer: DeviceSimulator
    pos: DeviceSimulator

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.runtime.ports['api']}"


@asynccontextmanager
async def shop(make_config: Callable[..., Config], tmp_path: Path, **orders: Any) -> AsyncIterator[Shop]:
    """Three device simulators (kds, printer, pos) and a whole appliance adopting them."""
    sims = {kind: DeviceSimulator(device_id=f"{kind}-1", kind=kind, log_path=tmp_path / f"{kind}.jsonl",
                                  key=device_key(f"{kind}-1"))
            for kind in ("kds", "printer", "pos")}
    async with trio.open_nursery() as nursery:
        ports = {k: await nursery.start(partial(run_device_simulator, s, port=0, bind="127.0.0.1"))
                 for k, s in sims.items()}
        devices = [{"id": f"{k}-1", "kind": k, "address": "127.0.0.1", "port": p, "key": device_key(f"{k}-1").hex()}
                   for k, p in ports.items()]
        runtime = await open_runtime(make_config(devices=devices, orders=orders))
        try:
            async with trio.open_nursery() as box:
                await box.start(lambda task_status: supervise_all(runtime, service_specs(runtime),
                                                                  task_status=task_status))
                yield Shop(runtime=runtime, kds=sims["kds"], printer=sims["printer"], pos=sims["pos"])
                runtime.stopping.set()
        finally:
            runtime.db.close()
            for s in sims.values():
                s.close()
        nursery.cancel_scope.cancel()


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Poll ``predicate`` (the simulators' memory, the peer's queue: nothing to wait on)."""
    with trio.fail_after(DEADLINE_S):
        while True:
            if predicate():
                return
            await trio.sleep(0.02)


async def until_async(fetch: Callable[[], Awaitable[T]], done: Callable[[T], bool]) -> T:
    with trio.fail_after(DEADLINE_S):
        while True:
            value = await fetch()
            if done(value):
                return value
            await trio.sleep(0.05)


async def contents(server: AmqpServer, queue: str, *, dead_letter: bool = False) -> list[Any]:
    return await trio.to_thread.run_sync(lambda: server.contents(queue, dead_letter=dead_letter))


async def test_an_order_reaches_the_kitchen_screen_and_the_printer(
    amqp_server: AmqpServer, queue_name: str, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    async with shop(make_config, tmp_path, **orders_section(amqp_server, queue_name)) as s:
        sender = sender_for(amqp_server, queue_name)
        try:
            await sender(order(1))
        finally:
            await sender.aclose()
        await until(lambda: len(s.kds.accepted) == 1 and len(s.printer.accepted) == 1, "the order on both devices")
        [cmd] = s.kds.accepted
        assert cmd.kind == "order.created"
        assert cmd.body["order"]["order_id"] == "web-000001" and cmd.body["source"] == "online"
        assert [c.kind for c in s.printer.accepted] == ["order.created"]
        assert list(s.pos.accepted) == []  # default routing: kitchen screens and printers only
        await until_async(lambda: contents(amqp_server, queue_name), lambda left: left == [])  # completed
        async with httpx.AsyncClient(timeout=10) as client:
            listing = (await client.get(f"{s.api}/v1/orders", headers=AUTH)).json()["orders"]
            assert [(o["source"], o["id"]) for o in listing] == [("online", "web-000001")]
            one = (await client.get(f"{s.api}/v1/orders/web-000001", headers=AUTH)).json()
            assert {c["device_id"] for c in one["commands"]} == {"kds-1", "printer-1"}
            assert (await client.get(f"{s.api}/v1/orders/nope", headers=AUTH)).status_code == 404
            assert (await client.get(f"{s.api}/v1/orders", headers={})).status_code == 401
            metrics = (await client.get(f"http://127.0.0.1:{s.runtime.ports['ops']}/metrics")).text
            assert "appliance_orders_received_total 1" in metrics
            assert 'appliance_servicebus_link_up{link="orders"} 1' in metrics
            # The WAN check probes the namespace the box really uses, where it connects (TLS verified).
            report = (await client.get(f"http://127.0.0.1:{s.runtime.ports['ops']}/health")).json()
            wan = {c["name"]: c for c in report["checks"] if c["name"].startswith("wan.")}
            assert wan["wan.localhost"]["status"] == "ok", wan
            assert "e-serversync-ns.servicebus.windows.net" not in str(wan)
            home = (await client.get(f"http://127.0.0.1:{s.runtime.ports['admin']}/")).text
            assert "Online orders" in home and "web-000001" in home and "Remote support" in home
        [check] = [c for c in await s.runtime.health.run_all() if c.name == "orders.link"]
        assert check.message.startswith("online orders: connected to localhost"), check


async def test_the_same_message_twice_gives_one_order_and_one_command(
    amqp_server: AmqpServer, queue_name: str, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    async with shop(make_config, tmp_path, **orders_section(amqp_server, queue_name)) as s:
        sender = sender_for(amqp_server, queue_name)
        try:
            await sender.send_many([order(7), order(7)])  # same message_id, delivered twice
            await sender(order(8))
        finally:
            await sender.aclose()
        await until(lambda: len(s.kds.accepted) == 2, "two orders on the kitchen screen")
        await until(lambda: s.runtime.metrics.value("orders_duplicates") == 1, "the repeat recognised")
        assert [c.body["order"]["order_id"] for c in s.kds.accepted] == ["web-000007", "web-000008"]
        assert s.kds.duplicates == 0  # the box did not even send it twice
        async with httpx.AsyncClient(timeout=10) as client:
            listing = (await client.get(f"{s.api}/v1/orders?source=online", headers=AUTH)).json()["orders"]
        assert sorted(o["id"] for o in listing) == ["web-000007", "web-000008"]
        assert s.runtime.metrics.value("orders_received") == 2


async def test_a_malformed_message_is_dead_lettered_and_the_receiver_goes_on(
    amqp_server: AmqpServer, queue_name: str, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    bad = ServiceBusMessage(b'{"order_id": "web-9", "lines": []}', message_id="bad-1")
    await trio.to_thread.run_sync(lambda: amqp_server.send(queue_name, bad))
    async with shop(make_config, tmp_path, **orders_section(amqp_server, queue_name)) as s:
        sender = sender_for(amqp_server, queue_name)
        try:
            await sender(order(2))
        finally:
            await sender.aclose()
        await until(lambda: len(s.kds.accepted) == 1, "the good order after the bad one")
        dead = await until_async(lambda: contents(amqp_server, queue_name, dead_letter=True), bool)
        [msg] = dead
        assert msg.id == "bad-1"
        assert msg.properties["DeadLetterReason"] == "not a valid order"
        assert msg.properties["DeadLetterErrorDescription"].startswith("currency: must be 3 capital letters")
        assert s.runtime.metrics.value("orders_dead_lettered") == 1


async def test_a_refused_key_says_so_plainly(
    amqp_server: AmqpServer, queue_name: str, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    async with shop(make_config, tmp_path, **orders_section(amqp_server, queue_name, sas_key="wrong")) as s:
        async def link_check() -> Any:
            return next(c for c in await s.runtime.health.run_all() if c.name == "orders.link")

        check = await until_async(link_check, lambda c: c.status == "fail")
        assert check.message == (f"cannot authenticate to localhost (queue {queue_name}): the namespace refused "
                                 "the SAS key 'appliance'")
        assert "check the pairing" in check.fix
        assert json.loads(json.dumps(check.data))["phase"] == "auth_failed"


# --- through a real HTTP proxy (Debian's tinyproxy), the namespace on 127.0.0.1:443 ---------

tinyproxy = test_servicebus_link.tinyproxy
amqp_server_on_443 = test_servicebus_link.amqp_server_on_443


async def test_orders_through_a_real_proxy(
    amqp_server_on_443: AmqpServer, tinyproxy: test_servicebus_link.ConnectProxy, queue_name: str,
    make_config: Callable[..., Config], tmp_path: Path,
) -> None:
    server = amqp_server_on_443
    section = orders_section(server, queue_name, testing={})  # as in production: <namespace>:443
    sims_cfg = make_config  # the proxy applies to every WAN path: [wan] proxy

    def with_proxy(**sections: Any) -> Config:
        return sims_cfg(wan={"proxy": tinyproxy.url}, **sections)

    async with shop(with_proxy, tmp_path, **section) as s:
        sender = sender_for(server, queue_name)
        try:
            await sender(order(3))
        finally:
            await sender.aclose()
        await until(lambda: len(s.kds.accepted) == 1, "the order through the proxy")
    log = tinyproxy.log.read_text(errors="replace")
    assert "CONNECT localhost:443 HTTP/1.1" in log, log

"""What the event log records, from the real services: a declared device adopted, its link
up and down, a command queued and acked, a price from sync (filtered by SKU prefix), and
the pairing state."""

from __future__ import annotations

import time
from functools import partial

import httpx
import trio

from appliance.devkit.device import DeviceSimulator, run_device_simulator
from appliance.storage.catalog import ReplicaWrite, apply_changes
from tests.conftest import ConfigFactory, device_key, running_box
from tests.event_clients import AUTH, TOKEN, next_event, next_message, ws_connect


async def test_devices_commands_sync_and_pairing_reach_the_stream(make_config: ConfigFactory) -> None:
    async with trio.open_nursery() as nursery:
        sim = DeviceSimulator(device_id="kds-1", key=device_key("kds-1"))
        scope = trio.CancelScope()

        async def device(*, task_status: trio.TaskStatus[int]) -> None:
            with scope:
                await run_device_simulator(sim, port=0, bind="127.0.0.1", task_status=task_status)

        port = await nursery.start(device)
        config = make_config(devices=[{"id": "kds-1", "kind": "kds", "address": "127.0.0.1", "port": port,
                                       "key": device_key("kds-1").hex()}],
                             dispatch={"ping_interval_s": 60.0})
        async with running_box(config) as runtime:
            events_port = runtime.ports["events"]
            async with ws_connect(events_port, f"/v1/events?after=0&topics=devices,commands,sync&token={TOKEN}") as ws:
                assert (await next_message(ws))["type"] == "subscribed"
                seen = [await next_event(ws) for _ in range(3)]
                types = {e["type"]: e for e in seen}
                assert types["device.adopted"]["data"] == {"device_id": "kds-1", "kind": "kds", "name": "kds-1",
                                                           "source": "config"}
                assert types["pairing.changed"]["data"] == {"paired": False, "store_id": None, "needs_repair": False}
                assert types["device.link_up"]["data"]["device_id"] == "kds-1"
                async with httpx.AsyncClient(headers=AUTH, timeout=10) as client:
                    answer = await client.post(f"http://127.0.0.1:{runtime.ports['api']}/v1/devices/kds-1/commands",
                                               json={"kind": "display", "body": {"text": "hello"}})
                    assert answer.status_code in (200, 201, 202), answer.text
                queued, acked = await next_event(ws), await next_event(ws)
                assert (queued["type"], acked["type"]) == ("command.queued", "command.acked")
                assert queued["data"]["command_id"] == acked["data"]["command_id"]
                assert acked["data"]["device_id"] == "kds-1" and acked["data"]["kind"] == "display"
                scope.cancel()  # the device goes away
                down = await next_event(ws)
                assert down["type"] == "device.link_down" and down["data"]["device_id"] == "kds-1"
                # A sync page: one event per change, and one for the page.
                await runtime.db.write(partial(apply_changes, writes=[
                    ReplicaWrite(entity="price", key="DRINK-1", data='{"amount_cents": 250}', seq=1),
                    ReplicaWrite(entity="price", key="FOOD-1", data='{"amount_cents": 900}', seq=2),
                    ReplicaWrite(entity="stock", key="DRINK-1", data=None, seq=3),
                ], cursor="c-3", now=time.time()))
                assert (await next_event(ws))["data"] == {"changes": 3}  # sync.pulled: catalog not subscribed
            query = f"/v1/events?after=0&topics=catalog&sku_prefix=DRINK-&token={TOKEN}"
            async with ws_connect(events_port, query) as ws:
                await next_message(ws)
                price, stock = await next_event(ws), await next_event(ws)
                assert price["type"] == "price.changed"
                assert price["data"] == {"sku": "DRINK-1", "price": {"amount_cents": 250}}
                assert stock["type"] == "stock.deleted" and stock["data"] == {"sku": "DRINK-1"}
        nursery.cancel_scope.cancel()

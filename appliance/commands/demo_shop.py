"""The demo: a whole shop on one machine, so a newcomer sees orders flow.

One trio loop runs the cloud simulator (real HTTPS with a local CA), three simulated
devices (a kitchen screen, a receipt printer, a POS) and the real appliance, configured
with its embedded defaults plus what the demo needs: the simulator as its cloud, the
devices declared, every listener on loopback. It pairs the box with the simulator's code,
then a kiosk posts an order to the store API every few seconds: each one reaches the
kitchen screen and the printer over the device channel and goes up to the platform as
an event. Now and then the platform changes a price, which the box pulls down.

With ``--online-orders`` (from a checkout whose test extra is installed) the platform also
takes orders online and puts them on the store's Service Bus queue, served by the test
AMQP 1.0 peer on loopback; the box receives them as it would from Azure.

Nothing leaves the machine: no discovery broadcast, no real Service Bus, no real platform.
Ctrl-C (SIGINT) or SIGTERM stops it all cleanly.

Every run starts a fresh shop: the box's state and the devices' logs from the previous run
are removed first (only the demo's own folders under the state directory). The simulated
platform lives in memory and is rebuilt from its seed at each start, so a box that kept its
old pairing, database and order counter would meet a platform that has never seen it (a
refused token, replayed order ids). Making the simulator persist as well would add a second
store of state to keep in step for a demo whose point is the same first day every time.
"""

from __future__ import annotations

import itertools
import logging
import random
import secrets
import shutil
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, Final

import attrs
import httpx
import trio

from appliance.config import Config, DeviceDecl, parse_config
from appliance.devkit.cloud import SimHandle, run_cloud_simulator
from appliance.devkit.cloud_state import QueueService, SimConfig
from appliance.devkit.device import DeviceSimulator, run_device_simulator
from appliance.devkit.device_client import DeviceAuth
from appliance.devkit.orders_sender import OrderSender
from appliance.services.assembly import service_specs
from appliance.services.pairing import pair_from_web
from appliance.services.runtime import Runtime
from appliance.services.servicebus import LinkOptions
from appliance.supervisor import open_runtime, supervise_all

__all__ = ["DemoOptions", "run_demo"]

log = logging.getLogger("appliance.demo")

DEVICES = (("kitchen-1", "kds", "Kitchen screen"), ("printer-1", "printer", "Receipt printer"),
           ("pos-1", "pos", "Till 1"), ("kiosk-1", "pos", "Self-order kiosk"))
# The kiosk posts orders to the store API, signed with its own key (docs/device-api.md).
KIOSK: Final = "kiosk-1"

# What one run keeps under the state directory, removed at the next start (fresh shop).
RUN_FOLDERS = ("box", "devices")


def fresh_state(state_dir: Path) -> None:
    """Remove the previous run's box state and device logs; nothing else under ``state_dir``."""
    for name in RUN_FOLDERS:
        shutil.rmtree(state_dir / name, ignore_errors=True)


@attrs.frozen(kw_only=True)
class DemoOptions:
    state_dir: Path
    port_offset: int = 0
    products: int = 200
    order_every_s: float = 5.0
    price_change_every_s: float = 30.0
    online_order_every_s: float = 7.0
    seed: int = 7


@attrs.frozen(kw_only=True)
class ServiceBusEndpoint:
    """Where the demo's online orders go: a Service Bus namespace reachable from here (the
    checkout's test AMQP peer on loopback). The platform puts orders on the store's queue;
    the box receives them exactly as it would from Azure, over AMQP/WebSockets with TLS."""

    namespace: str
    endpoint: str  # "host:port" the TLS connection really goes to
    ca_file: str
    sas_key_name: str
    sas_key: str


def _config(options: DemoOptions, sim: SimHandle, devices: list[DeviceDecl],
            bus: ServiceBusEndpoint | None) -> Config:
    # Online orders need a Service Bus namespace; pairing names the queue and the key, the
    # endpoint and CA say where the demo's namespace really is.
    orders: dict[str, Any] = ({"enabled": True, "testing": {"endpoint": bus.endpoint}, "ca_file": bus.ca_file,
                               "max_wait_s": 1.0}
                              if bus else {"enabled": False})
    return parse_config({
        "lan": {"bind": "127.0.0.1"},
        "storage": {"dir": str(options.state_dir / "box")},
        "discovery": {"enabled": False},  # a demo never broadcasts on the LAN it runs in
        "orders": orders,
        "cloud": {"api_url": sim.url, "ca_file": str(sim.ca_path), "pull_interval_s": 5.0,
                  "push_interval_s": 2.0, "heartbeat_interval_s": 30.0},
        "devices": [attrs.asdict(d) for d in devices],
    })


async def _kiosk(runtime: Runtime, options: DemoOptions, key: bytes, say: Callable[[str], None]) -> None:
    """Post an order to the store API every few seconds, as a self-order kiosk would: each
    request signed with the kiosk's key (it never holds the admin token)."""
    rng = random.Random(options.seed)
    api = f"http://127.0.0.1:{runtime.ports['api']}"
    async with httpx.AsyncClient(base_url=api, auth=DeviceAuth(KIOSK, key), timeout=10.0) as client:
        n, order, summary = 1, None, ""
        while True:
            await trio.sleep(options.order_every_s)
            if order is None:  # a new order; one the box did not answer is posted again, same id
                try:
                    page = await client.get("/v1/products", params={"limit": 50})
                except httpx.HTTPError as exc:
                    say(f"kiosk: the box did not answer: {exc!r}")
                    continue
                if page.status_code != 200 or not page.json().get("items"):
                    say("kiosk: waiting for the catalog to arrive from the cloud")
                    continue
                items = rng.sample(page.json()["items"], k=min(2, len(page.json()["items"])))
                lines = []
                for item in items:
                    price = await client.get(f"/v1/prices/{item['sku']}")
                    cents = price.json().get("amount_cents", 100) if price.status_code == 200 else 100
                    lines.append({"sku": item["sku"], "name": item.get("name", ""), "qty": rng.randint(1, 3),
                                  "unit_price_cents": cents})
                order = {"id": f"kiosk-{runtime.appliance_id[-6:]}-{n:05d}", "device_id": KIOSK, "currency": "EUR",
                         "total_cents": sum(line["qty"] * line["unit_price_cents"] for line in lines),
                         "lines": lines}
                summary = ", ".join(f"{line['qty']} x {line['name'] or line['sku']}" for line in lines)
            try:
                answer = await client.post("/v1/orders", json=order)
            except httpx.HTTPError as exc:
                say(f"kiosk: order {order['id']} not taken: {exc!r}; posting it again")
                continue
            say(f"kiosk: order {order['id']} ({summary}) -> box: HTTP {answer.status_code}")
            n, order = n + 1, None


async def _online_orders(sim: SimHandle, options: DemoOptions, say: Callable[[str], None]) -> None:
    """Now and then a customer orders online: the platform puts it on the store's queue."""
    async with httpx.AsyncClient(base_url=sim.url, verify=sim.ssl_context(), timeout=30.0) as client:
        for n in itertools.count(1):
            await trio.sleep(options.online_order_every_s)
            answer = await client.post("/_sim/orders", json={"count": 1, "first": n})
            if answer.status_code == 200:
                say(f"platform: online order {answer.json()['order_ids'][0]} put on the store's Service Bus queue")
            else:
                say(f"platform: online order not sent: HTTP {answer.status_code} {answer.text[:120]}")


async def _platform_changes(sim: SimHandle, options: DemoOptions, say: Callable[[str], None]) -> None:
    """Now and then the back office changes a price; the box pulls the change down."""
    rng = random.Random(options.seed + 1)
    while True:
        await trio.sleep(options.price_change_every_s)
        sku = sim.state.catalog.sku(rng.randrange(options.products))
        price = sim.state.get("price", sku)
        if price is None:
            continue
        cents = max(1, int(price["amount_cents"] * rng.choice((0.9, 1.1))))
        sim.state.upsert("price", sku, {**price, "amount_cents": cents})
        say(f"platform: the price of {sku} is now {cents / 100:.2f}; the box pulls it down")


async def run_demo(options: DemoOptions, *, bus: ServiceBusEndpoint | None = None,
                   say: Callable[[str], None] = print,
                   task_status: trio.TaskStatus[Runtime] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the whole shop until SIGINT/SIGTERM; ``started()`` gives the box's runtime.
    With ``bus``, the platform also sends online orders through that Service Bus."""
    options.state_dir.mkdir(parents=True, exist_ok=True)
    await trio.to_thread.run_sync(fresh_state, options.state_dir)
    async with trio.open_nursery() as outer:
        queue = None
        sender = None
        if bus is not None:
            queue = QueueService(namespace=bus.namespace, queue="demo-store-orders", sas_key_name=bus.sas_key_name,
                                 sas_key=bus.sas_key)
            sender = OrderSender(LinkOptions(namespace=bus.namespace, queue=queue.queue, sas_key_name=bus.sas_key_name,
                                             sas_key=bus.sas_key, endpoint=bus.endpoint, ca_file=bus.ca_file))
        sim_config = SimConfig(host="127.0.0.1", port=0, tls_dir=str(options.state_dir / "cloud-tls"),
                               products=options.products, seed=options.seed, orders=queue, support=None)
        sim: SimHandle = await outer.start(partial(run_cloud_simulator, sim_config, send_order=sender))
        declared = []
        # Devices declared with pre-shared keys: adopted from the start, in the demo only
        # (a shop's devices enroll and a manager adopts them on the homepage).
        keys = {device_id: secrets.token_bytes(32) for device_id, _, _ in DEVICES}
        for device_id, kind, name in DEVICES:
            def echo(line: str, device_id: str = device_id) -> None:
                say(f"{device_id}: {line[:120]}")

            device = DeviceSimulator(device_id=device_id, kind=kind, echo=echo, key=keys[device_id],
                                     log_path=options.state_dir / "devices" / f"{device_id}.jsonl")
            port = await outer.start(partial(run_device_simulator, device, port=0, bind="127.0.0.1"))
            declared.append(DeviceDecl(id=device_id, kind=kind, address="127.0.0.1", port=port, name=name,
                                       key=keys[device_id].hex()))
        runtime = await open_runtime(_config(options, sim, declared, bus), port_offset=options.port_offset)
        try:
            async with trio.open_nursery() as box:
                await box.start(lambda task_status: supervise_all(runtime, service_specs(runtime), publish=True,
                                                                  task_status=task_status))
                link = await pair_from_web(runtime, sim.pair_code)
                _banner(runtime, sim, link.store_id, say)
                outer.start_soon(_say_when_stopping, runtime, say)
                outer.start_soon(_until_stopping, runtime, partial(_kiosk, runtime, options, keys[KIOSK], say))
                outer.start_soon(_until_stopping, runtime, partial(_platform_changes, sim, options, say))
                if bus is not None:
                    outer.start_soon(_until_stopping, runtime, partial(_online_orders, sim, options, say))
                task_status.started(runtime)
        finally:
            runtime.db.close()
            if sender is not None:
                with trio.move_on_after(5, shield=True):
                    await sender.aclose()
        outer.cancel_scope.cancel()
    say("The demo has stopped: the box, the simulated platform and the devices are down.")


async def _say_when_stopping(runtime: Runtime, say: Callable[[str], None]) -> None:
    await runtime.stopping.wait()
    say("Stopping: the box finishes what it is doing (a few seconds at most)...")


async def _until_stopping(runtime: Runtime, task: Callable[[], Awaitable[None]]) -> None:
    """Run ``task`` until the box is asked to stop (the box then finishes its own work)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(task)
        await runtime.stopping.wait()
        nursery.cancel_scope.cancel()


def _banner(runtime: Runtime, sim: SimHandle, store_id: str, say: Callable[[str], None]) -> None:
    p = runtime.ports
    lines: list[Any] = [
        "",
        "The store appliance demo is running. Ctrl-C stops it.",
        f"  homepage     http://127.0.0.1:{p['admin']}/",
        f"  store API    http://127.0.0.1:{p['api']}/v1/products?limit=5   (signed by a device, or the admin token)",
        f"  health       http://127.0.0.1:{p['ops']}/health   and /metrics",
        f"  admin token  {runtime.admin_token}",
        f"  cloud        {sim.url} (simulated platform; paired with store {store_id})",
        f"  devices      {', '.join(f'{d} ({k})' for d, k, _ in DEVICES)} on 127.0.0.1",
        "",
    ]
    for line in lines:
        say(str(line))

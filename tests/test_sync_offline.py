"""The shop keeps selling with the platform unreachable, and every sale goes up once it is back,
without waiting for a new local write (the retry runs on its own timer).

"Unreachable" is real: the box talks to the simulator through a TCP relay on loopback, and
taking the relay down closes its port (connection refused) and cuts live connections.
"""

from __future__ import annotations

import pytest
import trio

from appliance.protocol.wan import Hop
from appliance.services.pairing import pair_from_web
from appliance.storage.catalog import sync_state
from appliance.storage.events import outbox_stats
from tests.sync_helpers import StartBox, StartSim, api_client, fast_cloud, wait_until

pytest_plugins = ["tests.sync_fixtures"]

SALES = 1000
CONCURRENT_POSTS = 20


class Relay:
    """Forwards loopback TCP connections to ``target_port``; :meth:`down` and :meth:`up` again
    on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._scope: trio.CancelScope | None = None

    async def _pipe(self, src: trio.abc.Stream, dst: trio.abc.Stream, done: trio.CancelScope) -> None:
        try:
            while data := await src.receive_some(65536):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()  # one side ended: end both

    async def _handle(self, client: trio.SocketStream) -> None:
        try:
            server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            await client.aclose()
            return
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(self._pipe, client, server, nursery.cancel_scope)
            nursery.start_soon(self._pipe, server, client, nursery.cancel_scope)

    async def _serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as scope:
            self._scope = scope
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            await trio.serve_listeners(self._handle, listeners, task_status=task_status)

    async def up(self, nursery: trio.Nursery) -> None:
        await nursery.start(self._serve)

    def down(self) -> None:
        assert self._scope is not None
        self._scope.cancel()


@pytest.mark.slow
async def test_a_thousand_sales_offline_all_go_up_once_the_platform_is_back(
        start_sim: StartSim, start_box: StartBox, nursery: trio.Nursery) -> None:
    sim = await start_sim()
    relay = Relay(sim.port)
    await relay.up(nursery)
    cloud = fast_cloud(sim, api_url=f"https://127.0.0.1:{relay.port}", push_batch=100)
    runtime = await start_box(cloud=cloud)
    await pair_from_web(runtime, sim.pair_code)

    async def synced() -> bool:
        return (await runtime.db.read(sync_state)).cursor == sim.state.cursor

    await wait_until(synced, 20.0, "the first sync")

    relay.down()  # the internet is gone
    statuses: list[int] = []

    async def post(worker: int) -> None:
        async with api_client(runtime) as api:
            for i in range(worker, SALES, CONCURRENT_POSTS):
                sale = {"id": f"off-{i:04d}", "device_id": f"pos-{worker}", "currency": "EUR", "total_cents": i,
                        "lines": [{"sku": "SKU-000001", "qty": 1, "unit_price_cents": i}]}
                statuses.append((await api.post("/v1/sales", json=sale)).status_code)

    async with trio.open_nursery() as posters:
        for worker in range(CONCURRENT_POSTS):
            posters.start_soon(post, worker)
    assert statuses == [201] * SALES  # the shop kept selling
    # (A kept-alive connection cut by the relay may fail first as "cut"; then the port is closed.)
    def refused() -> bool:
        error = runtime.sync_status.push.last_error
        return error is not None and error.hop is Hop.TCP and "connection refused" in error.message

    await wait_until(refused, 10.0, "an upload failing with connection refused")
    assert not any(key.startswith("sale-off-") for key in sim.state.events)
    stats = await runtime.db.read(outbox_stats)
    assert stats.queued == SALES and stats.oldest_unsent_at is not None

    writes_before = runtime.uplink_changes.version
    await relay.up(nursery)  # the internet is back; nothing is written locally from here on

    async def drained() -> bool:
        return (await runtime.db.read(outbox_stats)).queued == 0

    await wait_until(drained, 30.0, "the outbox draining")
    assert runtime.uplink_changes.version == writes_before
    arrived = sorted(k for k in sim.state.events if k.startswith("sale-off-"))
    assert arrived == [f"sale-off-{i:04d}" for i in range(SALES)]
    stats = await runtime.db.read(outbox_stats)
    assert (stats.accepted, stats.rejected, stats.in_flight) == (SALES, 0, 0)
    assert runtime.sync_status.push.last_error is None

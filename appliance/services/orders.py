"""The online orders receiver (docs/architecture.md §5, docs/orders.md): Service Bus -> devices, once.

One trio task (:func:`~appliance.services.queue_consumer.consume`) drives the store's
orders queue in peek-lock. For each message, in this order:

1. parse the body (:func:`appliance.protocol.orders.parse_order`); a body that is not an
   order is dead-lettered with the reason, and the receiver goes on;
2. in ONE SQLite transaction: the order keyed by ``message_id``, one device command per
   device the routing names (ids derived from message id and device), and the
   "received" event for the platform. A message taken before writes nothing;
3. commit (durable, ``synchronous=FULL``), then wake the dispatcher and the uplink;
4. complete the message.

A crash between 3 and 4 leaves the message locked; Service Bus delivers it again once
the lock lapses or the link closes, and step 2 recognises it: exactly one order, and
exactly one command per device. A crash before 3 commits nothing: the message comes back
and is taken then.

Where the queue comes from: the pairing's ``services.orders`` (namespace, queue, SAS key
name and key); each of ``[orders]`` namespace/queue/sas_key_name/sas_key set in the
config overrides it. Routing: ``store_config.routing`` from the replica, else
``[orders] routing``, else :data:`~appliance.protocol.orders.DEFAULT_ROUTING`.

Health check ``orders.link``; metrics ``orders_*`` and ``servicebus_link_*``; the state
for the homepage is ``runtime.orders_link`` (see ``appliance.services.web.orders``).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Mapping
from functools import partial
from typing import Any, Final

import attrs
import trio

from appliance.config import Config, ServiceBusConfig
from appliance.protocol.health import Check, Status
from appliance.protocol.orders import BUS_FIELDS, OnlineOrder, OrderError, bus_settings, parse_order
from appliance.protocol.text import Text
from appliance.services.queue_consumer import Disposition, OpenLink, Settle, consume
from appliance.services.runtime import Runtime
from appliance.services.servicebus import LinkOptions, ReceivedMessage, open_queue_link
from appliance.services.state import QueueLinkStatus, QueuePhase
from appliance.services.timestamps import rfc3339
from appliance.storage.orders import RETENTION_S, Recorded, order_targets, prune_orders, record_order

__all__ = ["LINK_FAIL_AFTER_S", "link_options", "run_orders"]

log = logging.getLogger(__name__)

# A link failing for longer than this fails the health check (before: a warning).
LINK_FAIL_AFTER_S: Final = 300.0
PRUNE_INTERVAL_S: Final = 3600.0
# How long the SDK blocks per socket poll (its default over WebSockets is 1 s): a message
# that arrives during a poll waits for its end. 0.2 s keeps an order under a second
# end to end (benchmarks/orders.py) for five wake-ups a second of one worker thread.
SOCKET_POLL_S: Final = 0.2



def link_options(runtime: Runtime, section: ServiceBusConfig, name: str) -> LinkOptions | str:
    """The options for the ``name`` queue (``orders`` or ``support``), or why there are none.

    Pairing gives the values; a config value that differs from the embedded default wins."""
    default_namespace = getattr(Config(), name).namespace
    store = runtime.store
    paired: Mapping[str, Any] = {}
    if store is not None and not store.needs_repair:
        paired = store.service(name) or {}
    values = bus_settings({f: getattr(section, f) for f in BUS_FIELDS}, default_namespace, paired)
    missing = [f for f in ("queue", "sas_key_name", "sas_key") if not values[f]]
    if missing:
        if store is None:
            return Text("not paired, and [{section}] does not give {missing}", section=name, missing=", ".join(missing))
        if store.needs_repair:
            return Text("the platform refused the box's token: pair the box again")
        return Text("the store has no {section} queue (pairing gives none, and [{section}] does not set {missing})",
                    section=name, missing=", ".join(missing))
    merged = attrs.evolve(section, namespace=values["namespace"], queue=values["queue"],
                          sas_key_name=values["sas_key_name"], sas_key=values["sas_key"])
    return attrs.evolve(LinkOptions.from_config(merged, runtime.config.wan), socket_timeout_s=SOCKET_POLL_S)


class OrderReceiver:
    """Handles one message at a time (the consumer calls it from its one task)."""

    def __init__(self, runtime: Runtime, state: QueueLinkStatus, *, clock: Any = time.time) -> None:
        self.runtime = runtime
        self.state = state
        self.clock = clock
        self.cfg = runtime.config.orders
        self.duplicates = 0
        self.orders = 0
        self.commands = 0

    def _write(self, conn: sqlite3.Connection, *, msg: ReceivedMessage, order: OnlineOrder, key: str,
               now: float) -> Recorded:
        return record_order(conn, message_id=key, order=order,
                            device_ids=order_targets(conn, order.kind, self.cfg.routing),
                            at=rfc3339(now), now=now, delivery_count=msg.delivery_count)

    async def handle(self, msg: ReceivedMessage) -> Settle:
        metrics = self.runtime.metrics
        try:
            order = parse_order(msg.body)
        except OrderError as exc:
            metrics.inc("orders_dead_lettered")
            log.warning("online order message %s is not an order; dead-lettered: %s", msg.message_id or "?", exc)
            return Settle(verdict=Disposition.DEAD_LETTER, reason="not a valid order", description=str(exc))
        # message_id is the dedup key (docs/architecture.md §5); a sender that sets none still gets
        # exactly-once through the order id.
        key = msg.message_id or f"order:{order.order_id}"
        now = self.clock()
        recorded = await self.runtime.db.write(partial(self._write, msg=msg, order=order, key=key, now=now))
        if recorded.created:
            self.orders += 1
            self.commands += len(recorded.commands)
            metrics.inc("orders_received")
            metrics.inc("orders_device_commands", len(recorded.commands))
            self.runtime.outbox_changes.notify()
            self.runtime.uplink_changes.notify()
            log.info("online order %s (%s) -> %d device command(s)", order.order_id, key, len(recorded.commands))
            if not recorded.commands:
                log.warning("online order %s went to no device: no adopted device's kind receives %s",
                            order.order_id, order.kind)
        else:
            self.duplicates += 1
            metrics.inc("orders_duplicates")
            log.info("online order message %s was taken before (delivery %d): nothing new", key,
                     msg.delivery_count)
        if pause_s := self.cfg.testing.pause_after_commit_s:
            log.warning("orders: test pause of %g s after the commit of %s", pause_s, key)
            await trio.sleep(pause_s)
        return Settle()


def _checks(runtime: Runtime) -> list[Check]:
    cfg = runtime.config.orders
    state = runtime.orders_link
    data = state.as_dict()
    name = "orders.link"
    if not cfg.enabled:
        return [Check(name=name, status=Status.OK, message=Text("online orders are off ([orders] enabled = false)"),
                      data=data)]
    where = Text("{namespace} (queue {queue})", namespace=state.namespace, queue=state.queue)
    phase = state.phase
    if phase is QueuePhase.CONNECTED:
        last = Text("no order yet") if state.last_message_at is None else \
            Text("last message {seconds} s ago", seconds=max(0, int(time.time() - state.last_message_at)))
        return [Check(name=name, status=Status.OK,
                      message=Text("online orders: connected to {where}; {last}", where=where, last=last),
                      data=data)]
    if phase is QueuePhase.UNCONFIGURED:
        return [Check(name=name, status=Status.OK if runtime.store is None else Status.WARN,
                      message=Text("online orders: not receiving: {detail}", detail=state.detail),
                      fix=Text("pair the box with its store (the pairing gives the queue)"), data=data)]
    if phase is QueuePhase.AUTH_FAILED:
        return [Check(name=name, status=Status.FAIL, message=state.last_error,
                      fix=Text("check the pairing: pair the box again, or fix [orders] sas_key_name / sas_key"),
                      data=data)]
    if phase is QueuePhase.CONFIG_ERROR:
        return [Check(name=name, status=Status.FAIL, message=Text("online orders cannot start: {error}",
                                                                        error=state.last_error),
                      fix=Text("fix the [orders] or [wan] settings"), data=data)]
    if phase is QueuePhase.RETRYING:
        long = state.failing_since is not None and time.time() - state.failing_since > LINK_FAIL_AFTER_S
        return [Check(name=name, status=Status.FAIL if long else Status.WARN,
                      message=Text("online orders: cannot reach {where}: {error}", where=where, error=state.last_error),
                      fix=Text("check the internet link and the proxy (HTTPS to the namespace on port 443)"),
                      data=data)]
    return [Check(name=name, status=Status.OK, message=Text("online orders: connecting to {where}", where=where),
                  data=data)]


def register(runtime: Runtime) -> None:
    """Health check and metrics of the orders receiver (once per runtime)."""
    state = runtime.orders_link

    async def checks() -> list[Check]:
        return _checks(runtime)

    runtime.health.add("orders", checks)
    metrics = runtime.metrics
    metrics.describe_counter("orders_received", "online orders taken (new message ids)")
    metrics.describe_counter("orders_duplicates", "online order messages delivered again (nothing new written)")
    metrics.describe_counter("orders_dead_lettered", "online order messages dead-lettered as not valid")
    metrics.describe_counter("orders_device_commands", "device commands caused by online orders")
    metrics.describe_counter("servicebus_link_failures", "Service Bus link failures, by link and kind")
    metrics.gauge("servicebus_link_up", "1 when the Service Bus link is connected",
                  lambda: [({"link": s.name}, 1.0 if s.phase is QueuePhase.CONNECTED else 0.0)
                           for s in (runtime.orders_link, runtime.support_link)])
    metrics.gauge("orders_last_message_age_seconds", "seconds since the last online order message (-1: none)",
                  lambda: -1.0 if state.last_message_at is None else max(0.0, time.time() - state.last_message_at))


async def _prune(runtime: Runtime) -> None:
    while True:
        await trio.sleep(PRUNE_INTERVAL_S)
        dropped = await runtime.db.write(partial(prune_orders, before=time.time() - RETENTION_S))
        if dropped:
            log.info("forgot %d online orders older than %d days", dropped, RETENTION_S // 86400)


async def run_orders(
    runtime: Runtime,
    *,
    open_link: OpenLink = open_queue_link,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The orders receiver, until cancelled. Ready at once: it needs no network to start."""
    register(runtime)
    state = runtime.orders_link
    receiver = OrderReceiver(runtime, state)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_prune, runtime)
        task_status.started()
        await consume(runtime, state, settings=lambda: link_options(runtime, runtime.config.orders, "orders"),
                      handle=receiver.handle, open_link=open_link)

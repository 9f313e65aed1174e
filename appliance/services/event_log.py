"""The event-log service: feeds the hub from the log after each commit, and prunes the log.

Start: the log's bounds are read and the newest ``ring_events`` events loaded into the
hub (so a client resuming right after a restart is served from memory), then a commit
hook on the database wakes the reader after every write. The reader also looks every
``_SAFETY_POLL_S`` for rows committed by another process (a CLI command) or by a write
whose hook did not run.

The reader queries its own read-only connection on the event loop itself: a page of at
most ``_READ_PAGE`` rows by primary key takes well under a millisecond, less than the
hop to a worker thread and back, which was most of the commit-to-delivery time under
load (docs/events.md has the figures). WAL readers never wait for the writer.

Prune: every ``[events] prune_interval_s``, and as soon as the log has grown past
``retention_rows`` by a tenth (docs/events.md states the bound).

Stop: the hub is told, so every connection sends ``closing`` and ends, and the listener
can finish quickly. Cancelled with the other non-graceful services.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Final

import trio
import trio.lowlevel

from appliance.services.runtime import Runtime
from appliance.services.signal import ChangeSignal
from appliance.storage import connect
from appliance.storage.event_log import append_if_changed, bounds, prune, read_after

__all__ = ["run_event_log"]

log = logging.getLogger(__name__)

# Rows read from the log per query by the hub's reader (on the event loop: keep it small).
_READ_PAGE: Final = 256
# Rows written by something that did not pass through Database.write are found this fast.
_SAFETY_POLL_S: Final = 1.0


async def run_event_log(runtime: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    hub, db, cfg = runtime.event_hub, runtime.db, runtime.config.events
    commits = ChangeSignal()
    start = await db.read(bounds)
    hub.set_bounds(start)
    # After a restart of this service the hub keeps what it holds and reads on from there.
    rows = await db.read(partial(read_after, after=max(start.oldest - 1, start.head - cfg.ring_events, hub.head),
                                 limit=cfg.ring_events))
    hub.load(rows)
    hub.head = max(hub.head, start.head)
    own = await trio.to_thread.run_sync(partial(connect, db.path, readonly=True))
    remove_hook = db.on_commit(commits.notify)
    m = runtime.metrics
    m.gauge("event_log_head", "the highest event id written", lambda: float(hub.head))
    m.gauge("event_subscribers", "clients following the event stream on port 8001", lambda: float(hub.subscribers))
    m.gauge("event_log_oldest", "the first event id the log still keeps", lambda: float(hub.oldest))
    m.gauge("event_dispatch_seconds", "from an event's commit to a subscriber's connection taking it to send, "
            "for subscribers keeping up (newest 4096)", hub.handoff_quantiles)
    m.describe_counter("event_messages_sent", "events handed to subscribers on port 8001")
    m.describe_counter("event_subscribers_evicted", "subscribers told to resume because they fell behind")
    prune_now = ChangeSignal()

    async def reader() -> None:
        while True:
            await trio.lowlevel.checkpoint()
            seen = commits.version
            page = read_after(own, hub.head, _READ_PAGE)
            hub.load(page)
            if hub.head - hub.oldest + 1 > cfg.retention_rows * 1.1:
                prune_now.notify()
            if len(page) == _READ_PAGE:
                continue
            with trio.move_on_after(_SAFETY_POLL_S):
                await commits.wait(seen)

    async def pruner() -> None:
        while True:
            seen = prune_now.version
            dropped = await db.write(partial(prune, max_rows=cfg.retention_rows,
                                             before=time.time() - cfg.retention_s))
            hub.set_bounds(await db.read(bounds))
            if dropped:
                log.info("event log: pruned %d events; it now starts at id %d", dropped, hub.oldest)
            with trio.move_on_after(cfg.prune_interval_s):
                await prune_now.wait(seen)

    async def pairing_watcher() -> None:
        # The pairing lives in a file, not the database: its changes are logged as seen.
        seen = 0
        while True:
            seen = await runtime.pairing_changes.wait(seen)
            store = runtime.store
            state = {"paired": store is not None and not store.needs_repair,
                     "store_id": store.store_id if store is not None else None,
                     "needs_repair": bool(store is not None and store.needs_repair)}
            await db.write(partial(append_if_changed, type="pairing.changed", data=state, now=time.time()))

    async def stop_watcher() -> None:
        await runtime.stopping.wait()
        hub.stop()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(pruner)
            nursery.start_soon(stop_watcher)
            nursery.start_soon(pairing_watcher)
            task_status.started()
    finally:
        remove_hook()
        own.close()

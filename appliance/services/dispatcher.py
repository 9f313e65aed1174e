"""The device dispatcher: pushes each adopted device's outbox to it on TCP 8081 (docs/architecture.md §7).

One :class:`~appliance.services.device_link.DeviceLink` task per adopted device, started
and stopped as ``runtime.device_changes`` says the registry changed (a device adopted,
rejected, removed, or moved to another address). :func:`enqueue` and :func:`enqueue_many`
hand the commands they committed to their devices' links (``runtime.outbox_changes.hand``:
no read of the outbox between the commit and the send); other producers notify
``runtime.outbox_changes``, which wakes the links whose devices got new commands (one small
read of ``outbox_seq`` per wake-up, so nothing polls). One recorder task writes what the
links report (sent, acked, dead), many records per transaction, committed without waiting
for the disk (a power cut may lose the last of them; their commands are then sent again
and the device dedupes them). A link holds a command's sent record until the window
empties (at most 0.1 s), so that with the ack ~1 ms later both share one commit.

Also here: a maintenance task (expired commands swept to dead, settled commands pruned
after ``acked_retention_s``, the backlog figures behind the gauges refreshed), the
``dispatch`` health checks (outbox backlog, and one per adopted device), metrics, and
:func:`enqueue` for in-process producers.

Stop (graceful service): on ``runtime.stopping`` no new command is sent; each link
waits for the acks of what it has in flight, then closes; the recorder writes the last
records and the service returns. Unacknowledged commands stay queued or sent in the
outbox and go out again at the next start. The supervisor's deadline cancels whatever
is still waiting.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Final, Protocol

import attrs
import trio

from appliance.protocol.channel import Record
from appliance.protocol.health import Check, Status
from appliance.protocol.text import Text, join
from appliance.services.device_link import (
    DeviceLink,
    DeviceLinkPhase,
    LinkNote,
    LinkStatus,
    LinkTarget,
    OpenStream,
    open_tcp,
)
from appliance.services.runtime import Runtime
from appliance.storage import Database
from appliance.storage.devices import Device, DeviceSource, list_adopted
from appliance.storage.event_log import append as log_event
from appliance.storage.outbox import (
    Backlog,
    Enqueued,
    apply_records,
    backlogs,
    enqueue_in,
    expire_due,
    last_seqs,
    prune_settled,
)

__all__ = ["DeviceLike", "enqueue", "enqueue_many", "run_dispatcher"]

log = logging.getLogger(__name__)

# Batches of records waiting for the recorder: links block (back-pressure) beyond this.
_RECORDER_QUEUE: Final = 64
# Records written in one transaction at most.
_RECORDS_PER_WRITE: Final = 4096
# The gauges' backlog figures are refreshed this often (a gauge cannot read the database).
_BACKLOG_REFRESH_S: Final = 5.0


class DeviceLike(Protocol):
    """What the dispatcher reads of a registry device (``appliance.storage.devices.Device``)."""

    @property
    def id(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def port(self) -> int: ...


AdoptedFn = Callable[[sqlite3.Connection], Sequence[DeviceLike]]




async def enqueue(
    runtime: Runtime,
    device_id: str,
    kind: str,
    body: Mapping[str, Any],
    expires_at: float | None = None,
    *,
    command_id: str | None = None,
    body_text: str | None = None,
) -> Enqueued:
    """Add a command to a device's outbox, durably (committed on return), and wake the
    dispatcher. Raises :class:`~appliance.storage.outbox.OutboxError` for a bad command.
    ``body_text``: the body as ``encode_body`` made it, if the caller has it (see ``enqueue_in``)."""
    result = await runtime.db.write(partial(enqueue_in, device_id=device_id, kind=kind, body=body,
                                            expires_at=expires_at, command_id=command_id, body_text=body_text))
    if result.created:
        runtime.outbox_changes.hand((result,))
    return result


async def enqueue_many(
    runtime: Runtime, commands: Sequence[tuple[str, str, Mapping[str, Any], float | None, str | None]]
) -> list[Enqueued]:
    """Add ``(device_id, kind, body, expires_at, command_id)`` commands in one transaction
    (all or none; one durable commit for the lot), in order, and wake the dispatcher."""

    def write(conn: sqlite3.Connection) -> list[Enqueued]:
        return [enqueue_in(conn, device_id, kind, body, expires_at, command_id=command_id)
                for device_id, kind, body, expires_at, command_id in commands]

    result = await runtime.db.write(write)
    if any(e.created for e in result):
        runtime.outbox_changes.hand(result)
    return result


@attrs.define(eq=False)
class _Handle:
    link: DeviceLink
    records: trio.MemorySendChannel[list[Record | LinkNote]]  # the link's clone of the recorder's channel
    scope: trio.CancelScope
    done: trio.Event = attrs.field(factory=trio.Event)


class _Dispatcher:
    def __init__(
        self,
        runtime: Runtime,
        records: trio.MemorySendChannel[list[Record | LinkNote]],
        *,
        open_stream: OpenStream,
        adopted: AdoptedFn,
        clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self.runtime = runtime
        self.config = runtime.config.dispatch
        self.board = runtime.device_links
        self.records = records
        self.open_stream = open_stream
        self.adopted = adopted
        self.clock = clock
        self.rng = rng
        self.handles: dict[str, _Handle] = {}

    async def refresh(self, nursery: trio.Nursery) -> None:
        """Make the running links match the adopted devices."""
        wanted = {t.id: t for t in map(self._target, await self.runtime.db.read(self.adopted)) if t is not None}
        for device_id, handle in list(self.handles.items()):
            target = wanted.get(device_id)
            if target is None or (target.address, target.port, target.key) != (
                    handle.link.target.address, handle.link.target.port, handle.link.target.key):
                handle.scope.cancel()
                await handle.done.wait()
                del self.handles[device_id]
                self.board.links.pop(device_id, None)
                log.info("device %s: link stopped (%s)", device_id, "no longer adopted" if target is None else
                         f"moved to {target.address}:{target.port}")
            elif target != handle.link.target:
                handle.link.target = handle.link.status.target = target  # a new name or kind only
        for device_id, target in wanted.items():
            if device_id not in self.handles:
                records = self.records.clone()
                link = DeviceLink(target, config=self.config, db=self.runtime.db, records=records,
                                  metrics=self.runtime.metrics, open_stream=self.open_stream, clock=self.clock,
                                  rng=random.Random(self.rng.random()),
                                  ask_ticket=self.runtime.ticket_requests.ask)
                handle = _Handle(link=link, records=records, scope=trio.CancelScope())
                self.handles[device_id] = handle
                self.board.links[device_id] = link.status
                nursery.start_soon(self._run_link, handle)
                log.info("device %s: link started to %s:%d", device_id, target.address, target.port)
        # The services table says how many links run now, not how many ran at start.
        self.runtime.board.say("dispatcher", Text("{count} device(s)", count=len(self.handles)))

    def _target(self, d: DeviceLike) -> LinkTarget | None:
        """The link to ``d``, or None: a registry device with no key gets no commands,
        unless it was adopted before enrollment existed (``legacy``)."""
        key = None
        if isinstance(d, Device):
            key = self.runtime.keys.key_of(d)
            if key is None and not d.legacy:
                return None
        return LinkTarget(id=d.id, kind=d.kind, name=d.name or d.id, address=d.address, port=d.port, key=key)

    async def _run_link(self, handle: _Handle) -> None:
        try:
            with handle.records, handle.scope:
                await handle.link.run()
        finally:
            handle.done.set()

    async def watch_devices(self, nursery: trio.Nursery) -> None:
        seen = self.runtime.device_changes.version
        while True:
            seen = await self.runtime.device_changes.wait(seen)
            await self.refresh(nursery)

    def take(self, enqueued: Sequence[Enqueued]) -> None:
        """New commands, committed, handed over by their enqueue (``runtime.outbox_changes``):
        each to its device's link (a device with no link gets its commands from the outbox
        when one starts)."""
        for e in enqueued:
            handle = self.handles.get(e.device_id)
            if handle is not None and e.command is not None:
                handle.link.take(e.command)

    async def watch_outbox(self) -> None:
        seen = 0
        while True:
            seen = await self.runtime.outbox_changes.wait(seen)
            # One small row per device: read in trio's thread, the hop to a worker thread
            # costing more than the read (this runs after every enqueue's commit).
            seqs = await self.runtime.db.read_small(last_seqs)
            for device_id, handle in self.handles.items():
                if device_id in seqs:
                    handle.link.new_commands(seqs[device_id])

    async def maintain(self) -> None:
        db, cfg = self.runtime.db, self.config
        next_sweep = 0.0
        while True:
            now = self.clock()
            if now >= next_sweep:
                expired = await db.write(partial(expire_due, now=now))
                pruned = await db.write(partial(prune_settled, before=now - cfg.acked_retention_s))
                if expired or pruned:
                    log.info("outbox: %d command(s) expired undelivered, %d settled one(s) pruned", expired, pruned)
                next_sweep = now + cfg.maintenance_interval_s
            self.board.backlog = {b.device_id: b for b in await db.read(backlogs)}
            self.board.backlog_at = now
            await trio.sleep(min(_BACKLOG_REFRESH_S, cfg.maintenance_interval_s))

    async def drain(self) -> None:
        """Graceful stop of every link; returns once all have ended."""
        for handle in self.handles.values():
            handle.link.stop()
        for handle in list(self.handles.values()):
            await handle.done.wait()


def _apply(conn: sqlite3.Connection, items: list[Record | LinkNote]) -> None:
    """The links' records, and their going up and down logged for the event stream."""
    apply_records(conn, [r for r in items if not isinstance(r, LinkNote)])
    for note in items:
        if isinstance(note, LinkNote):
            log_event(conn, note.type, note.data, now=note.at, device_id=note.device_id)


async def _record(db: Database, receive: trio.MemoryReceiveChannel[list[Record | LinkNote]]) -> None:
    """Write the links' records, everything waiting in one transaction, until every link
    and the dispatcher have closed their ends of the channel."""
    async with receive:
        async for batch in receive:
            records = list(batch)
            while len(records) < _RECORDS_PER_WRITE:
                try:
                    records.extend(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            # Not durable: a record lost to a power cut (never to a crash) sends its command
            # again, which the device dedupes by id; the enqueues' commits keep their fsync
            # instead of queueing behind 1.6 record commits per command (scripts/bench dispatch).
            await db.write(partial(_apply, items=records), durable=False)


async def run_dispatcher(
    runtime: Runtime,
    *,
    open_stream: OpenStream = open_tcp,
    adopted: AdoptedFn = list_adopted,
    clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The dispatcher service: runs until ``runtime.stopping``, then drains and returns.

    ``open_stream(host, port)`` makes the byte stream to a device (TCP by default; tests
    pass memory streams); ``adopted(conn)`` lists the devices to push to."""
    send, receive = trio.open_memory_channel[list[Record | LinkNote]](_RECORDER_QUEUE)
    dispatcher = _Dispatcher(runtime, send, open_stream=open_stream, adopted=adopted, clock=clock,
                             rng=rng or random.Random())
    dispatcher.board.links.clear()  # a restart after a crash starts from what the registry says
    _register(runtime, dispatcher)
    async with trio.open_nursery() as outer:
        outer.start_soon(_record, runtime.db, receive)
        with send:
            async with trio.open_nursery() as links:
                async with trio.open_nursery() as watchers:
                    await dispatcher.refresh(links)
                    watchers.start_soon(dispatcher.watch_devices, links)
                    watchers.start_soon(dispatcher.watch_outbox)
                    watchers.start_soon(dispatcher.maintain)
                    stop_taking = runtime.outbox_changes.take_with(dispatcher.take)
                    try:
                        runtime.board.say("dispatcher", Text("{count} device(s)", count=len(dispatcher.handles)))
                        task_status.started()
                        await runtime.stopping.wait()
                    finally:
                        stop_taking()  # enqueues from now on only notify: the next start reads the outbox
                    watchers.cancel_scope.cancel()
                await dispatcher.drain()
        # The recorder ends once every link's channel clone and ours are closed.


# --- health and metrics -------------------------------------------------------------


def _age(seconds: float) -> Text:
    s = max(0, int(seconds))
    if s < 120:
        return Text("{seconds} s", seconds=s)
    if s < 7200:
        return Text("{minutes} min", minutes=s // 60)
    return Text("{hours} h {minutes} min", hours=s // 3600, minutes=s % 3600 // 60)


def link_check(status: LinkStatus, backlog: Backlog | None, now: float) -> Check:
    """``device.<id>.channel``: is the box connected to this device, and if not, why."""
    t = status.target
    name = f"device.{t.id}.channel"
    who = Text("device {name}", name=t.name) if t.name == t.id else Text("device {name} ({id})", name=t.name, id=t.id)
    where = f"{t.address}:{t.port}"
    waiting = backlog.depth if backlog is not None else 0
    data: dict[str, Any] = {**status.as_dict(), "waiting": waiting}
    if status.phase is DeviceLinkPhase.CONNECTED:
        message = (Text("{who}: connected to {where}", who=who, where=where) if status.last_ack_at is None else
                   Text("{who}: connected to {where}; last ack {age} ago", who=who, where=where,
                        age=_age(now - status.last_ack_at)))
        return Check(name=name, status=Status.OK, message=message, data=data)
    if not status.last_error:
        message = (Text("{who}: connecting to {where}; {count} command(s) wait for it", who=who, where=where,
                        count=waiting) if waiting else Text("{who}: connecting to {where}", who=who, where=where))
        return Check(name=name, status=Status.WARN, message=message, data=data,
                     fix=Text("wait a few seconds; if it stays so, check the device is on and its app running"))
    message = (Text("{who}: {error}; {count} command(s) wait for it", who=who, error=status.last_error,
                    count=waiting) if waiting else Text("{who}: {error}", who=who, error=status.last_error))
    return Check(name=name, status=Status.FAIL if waiting else Status.WARN, message=message, fix=status.last_fix,
                 data=data)


def outbox_check(backlog: Sequence[Backlog], adopted: set[str], now: float, warn_age_s: float,
                 fail_age_s: float) -> Check:
    """``dispatch.outbox``: how many commands wait, and how long the oldest has waited."""
    name = "dispatch.outbox"
    if not backlog:
        return Check(name=name, status=Status.OK, message=Text("no command waiting for any device"),
                     data={"depth": 0, "devices": 0})
    depth = sum(b.depth for b in backlog)
    oldest = min(backlog, key=lambda b: b.oldest_created_at)
    age = now - oldest.oldest_created_at
    unsent = [b.oldest_unsent_at for b in backlog if b.oldest_unsent_at is not None]
    oldest_unsent_age = now - min(unsent) if unsent else None
    orphans = sorted(b.device_id for b in backlog if b.device_id not in adopted)
    data = {"depth": depth, "devices": len(backlog), "oldest_unacked_age_s": round(age, 1),
            "oldest_unsent_age_s": None if oldest_unsent_age is None else round(oldest_unsent_age, 1),
            "not_adopted": orphans}
    message = Text("{depth} command(s) waiting for {devices} device(s); the oldest, for {device}, has waited {age}",
                   depth=depth, devices=len(backlog), device=oldest.device_id, age=_age(age))
    status, fixes = Status.OK, []
    if age >= fail_age_s or age >= warn_age_s:
        status = Status.FAIL if age >= fail_age_s else Status.WARN
        fixes.append(Text("see the check of device {device}: commands stay in the outbox until the device "
                          "acknowledges them or they expire", device=oldest.device_id))
    if orphans:
        status = Status.WARN if status is Status.OK else status
        message = Text("{message}; {devices} not adopted", message=message,
                       devices=f"{', '.join(orphans[:5])}{'...' if len(orphans) > 5 else ''}")
        fixes.append(Text("adopt those devices on the homepage (or declare them in [[devices]]); "
                          "their commands wait until then or until they expire"))
    return Check(name=name, status=status, message=message, fix=join("; ", fixes), data=data)


def key_check(runtime: Runtime, d: DeviceLike) -> Check | None:
    """``device.<id>.key``: an adopted device the box cannot authenticate (no key yet)."""
    if not isinstance(d, Device) or runtime.keys.key_of(d) is not None:
        return None
    name, who = f"device.{d.id}.key", Text("device {name}", name=d.id)
    if d.legacy:
        return Check(name=name, status=Status.WARN, data={"device_id": d.id, "legacy": True},
                     message=Text("{who}: adopted before enrollment; commands go to it unauthenticated until it "
                                  "enrolls", who=who),
                     fix=Text("update the device's app so it enrolls (docs/device-api.md) and accept its key on the "
                              "homepage, or press 'Require enrollment' to stop sending to it unauthenticated"))
    declared = d.source is DeviceSource.CONFIG
    return Check(name=name, status=Status.WARN, data={"device_id": d.id, "legacy": False},
                 message=Text("{who}: adopted but has no key: it gets no commands", who=who),
                 fix=Text("set key in its [[devices]] entry (`appliance device-key` makes one)") if declared else
                     Text("have the device enroll on the provisioning port and accept it on the homepage"))


def _register(runtime: Runtime, dispatcher: _Dispatcher) -> None:
    board, cfg, clock = dispatcher.board, dispatcher.config, dispatcher.clock

    async def checks() -> list[Check]:
        now = clock()
        backlog = await runtime.db.read(backlogs)
        adopted = {d.id for d in await runtime.db.read(dispatcher.adopted)}
        by_device = {b.device_id: b for b in backlog}
        out = [outbox_check(backlog, adopted, now, cfg.warn_age_s, cfg.fail_age_s)]
        out += [link_check(s, by_device.get(s.target.id), now) for s in board.all()]
        out += [c for d in await runtime.db.read(dispatcher.adopted) if (c := key_check(runtime, d)) is not None]
        return out

    runtime.health.add("dispatch", checks)
    metrics = runtime.metrics
    metrics.describe_counter("device_commands_sent", "commands sent to devices (resends included)")
    metrics.describe_counter("device_commands_acked", "commands acknowledged by devices")
    metrics.describe_counter("device_commands_dead", "commands expired or refused for good")
    metrics.describe_counter("device_link_failures", "device connections that failed or broke")
    metrics.gauge("outbox_depth", "unacknowledged commands per device",
                  lambda: [({"device": d}, float(b.depth)) for d, b in sorted(board.backlog.items())])
    metrics.gauge("outbox_oldest_unacked_seconds", "age of the oldest unacknowledged command per device",
                  lambda: [({"device": d}, round(max(0.0, (board.backlog_at or 0.0) - b.oldest_created_at), 1))
                           for d, b in sorted(board.backlog.items())])
    metrics.gauge("device_link_connected", "1 while the box is connected to the device",
                  lambda: [({"device": s.target.id}, float(s.phase is DeviceLinkPhase.CONNECTED)) for s in board.all()])

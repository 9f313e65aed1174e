"""The cloud sync service (docs/architecture.md §4, docs/cloud-contract.md): three loops on one client.

- pull: pages of changes, each applied in one transaction together with its cursor; a
  410 (or no cursor yet) reads the snapshot, streamed into a staging table in batches
  of :data:`SNAPSHOT_BATCH_ROWS` and swapped in at its end in one transaction. Memory
  stays bounded by one batch plus one line whatever the catalog's size.
- push: the events outbox in batches, each under an Idempotency-Key derived from the
  batch (the same batch, retried, carries the same key, even after a restart). Retries
  run on their own timer with capped backoff and jitter, never sooner than Retry-After,
  whether or not anything new is written locally. A batch refused as a whole is split
  until the bad event is alone, which is then rejected with its reason; rejected
  events are kept and never sent again.
- heartbeat: firmware, uptime, the health summary, the queue depths and the update's
  state; its answer may offer a firmware, handed to ``runtime.firmware``.

A 401 or 403 marks the pairing "re-pair needed" and parks the three loops until the box
is paired again; the LAN keeps serving. Every failure is located on its network path
(DNS, TCP, proxy, TLS, HTTP) and shown on the homepage, in /api/status and as health
checks. Cancellation: each loop is cancelled between or inside calls; a database write
already started completes (``Database.write``), so no state is half-written.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any, Final

import httpx
import trio

from appliance import __version__
from appliance.protocol.health import Check, Status, worst
from appliance.protocol.sync import (
    CallVerdict,
    LoopStatus,
    Pacer,
    SnapshotEnd,
    SnapshotReader,
    SnapshotRecord,
    SyncProtocolError,
    Uplink,
    batch_key,
    http_failure,
    judge,
    parse_changes,
    parse_error,
    parse_events_answer,
    parse_retry_after,
    product_name,
)
from appliance.protocol.text import Text
from appliance.protocol.wan import Hop, HopFailure
from appliance.services.pairing import mark_repair_needed
from appliance.services.runtime import Runtime
from appliance.services.signal import ChangeSignal
from appliance.services.sync_health import register
from appliance.services.timestamps import rfc3339
from appliance.services.wan import (
    ProxySettings,
    WanConfigError,
    client_for,
    close_client,
    cloud_route,
    locate_failure,
)
from appliance.storage.catalog import (
    ReplicaWrite,
    SyncState,
    apply_changes,
    begin_snapshot,
    drop_old_replica,
    finish_snapshot,
    require_snapshot,
    set_store,
    stage_rows,
    sync_state,
)
from appliance.storage.events import (
    OutboxEvent,
    claim_batch,
    outbox_stats,
    prune_accepted,
    reject_batch,
    release_batch,
    settle_batch,
)
from appliance.storage.pairing import StoreLink

__all__ = ["SNAPSHOT_BATCH_ROWS", "CloudSync", "json_text", "run_sync"]

log = logging.getLogger(__name__)

# Snapshot rows per staging transaction: about 1.5 MB of products; big enough that the
# per-transaction fsync is noise, small enough to keep memory flat (measured: see the
# snapshot benchmark).
SNAPSHOT_BATCH_ROWS: Final = 5000
# Answers bigger than this are not the platform's: a changes page of 1000 records is
# well under 2 MB; error bodies and events answers far less.
ANSWER_MAX_BYTES: Final = 16 * 1024 * 1024
# The heartbeat's body limit is 64 KiB (contract); keep a margin.
HEARTBEAT_MAX_BYTES: Final = 60_000
HEARTBEAT_CHECKS_MAX: Final = 100
CHECK_MESSAGE_MAX: Final = 300
# How often accepted events older than cloud.accepted_retention_s are dropped.
PRUNE_INTERVAL_S: Final = 3600.0
# Parsed snapshot batches waiting for the writer: two keep parsing and writing overlapped.
SNAPSHOT_BATCHES_QUEUED: Final = 2
# A snapshot whose cursor is refused right away again means something is wrong on the
# platform; stop and back off instead of reading snapshots in a loop.
SNAPSHOTS_PER_ROUND_MAX: Final = 2


def json_text(value: Any) -> str:
    """Compact JSON text that SQLite can store: UTF-8 where possible, escapes for a lone
    surrogate (valid JSON that is not valid UTF-8 would fail the insert)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value, separators=(",", ":"), sort_keys=True)
    return text


_REPLICA_JSON: Final = json.JSONEncoder(separators=(",", ":")).encode


def _write_of(entity: str, key: str, data: Mapping[str, Any] | None, seq: int = 0) -> ReplicaWrite:
    """A replica row from a record. Its data is kept as ASCII JSON: always valid UTF-8 for
    SQLite whatever the platform sent (a lone surrogate stays an escape)."""
    name = product_name(data) if data is not None and entity == "product" else ""
    text = None if data is None else _REPLICA_JSON(data)
    return ReplicaWrite(entity=entity, key=key, data=text, seq=seq, name=name)


class _CallFailed(Exception):
    """One call to the platform did not succeed; ``verdict`` says what to do about it."""

    def __init__(self, error: HopFailure, *, verdict: CallVerdict = CallVerdict.RETRY,
                 retry_after_s: float | None = None, code: str = "") -> None:
        self.error, self.verdict, self.retry_after_s, self.code = error, verdict, retry_after_s, code
        super().__init__(error.message)


async def _read_body(response: httpx.Response, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise SyncProtocolError(f"the answer is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class CloudSync:
    """The three loops, sharing one ``httpx.AsyncClient`` (owned and closed by the caller)."""

    def __init__(self, runtime: Runtime, client: httpx.AsyncClient, *, proxy: ProxySettings | None,
                 clock: Callable[[], float] = time.time) -> None:
        self.runtime = runtime
        self.client = client
        self.proxy = proxy
        self.clock = clock
        cfg = runtime.config.cloud
        self.cfg = cfg
        self.status = runtime.sync_status
        self.host = client.base_url.host
        self.target = f"{self.host}:{client.base_url.port or 443}"
        # One call's whole deadline: connecting plus reading the answer, with a margin
        # for the request body on a slow uplink.
        self.call_deadline_s = cfg.connect_timeout_s + 2 * cfg.read_timeout_s
        self.uplink = Uplink(limit=cfg.push_batch)
        # How long the last snapshot's swap took (its write, commit included), for the log
        # and the benchmark: the time the writer was held from every other write.
        self.last_swap_s: float | None = None

    # -- shared plumbing -----------------------------------------------------------------

    def _pacer(self) -> Pacer:
        return Pacer(initial_s=self.cfg.backoff_initial_s, max_s=self.cfg.backoff_max_s)

    async def linked(self) -> StoreLink:
        """The current pairing once the box is paired and its token not refused."""
        signal = self.runtime.pairing_changes
        while True:
            seen = signal.version
            store = self.runtime.store
            if store is not None and not store.needs_repair:
                return store
            await signal.wait(seen)

    async def pause(self, delay_s: float, *, since: Sequence[tuple[ChangeSignal, int]] = ()) -> None:
        """Sleep ``delay_s``, or less if the pairing changes (a new pairing retries at once)
        or a signal of ``since`` moves past the version given with it (taken before the
        work that precedes the pause, so a notification during that work is not missed)."""
        pairing = self.runtime.pairing_changes
        watched = [(pairing, pairing.version), *since]
        with trio.move_on_after(delay_s):
            async with trio.open_nursery() as nursery:
                for signal, seen in watched:
                    nursery.start_soon(self._until, signal, seen, nursery.cancel_scope)

    @staticmethod
    async def _until(signal: ChangeSignal, seen: int, scope: trio.CancelScope) -> None:
        await signal.wait(seen)
        scope.cancel()

    def _failure(self, response: httpx.Response, body: bytes) -> _CallFailed:
        retry_after = parse_retry_after(response.headers.get("retry-after"), now=self.clock())
        decision = judge(response.status_code, retry_after_s=retry_after)
        code, reason = parse_error(body)
        error = http_failure(self.target, response.status_code, code=code, reason=reason)
        return _CallFailed(error, verdict=decision.verdict, retry_after_s=decision.delay_s, code=code)

    def _transport(self, exc: BaseException) -> _CallFailed:
        if isinstance(exc, trio.TooSlowError):
            error = HopFailure.at(Hop.HTTP, self.target,
                                 Text("{target} did not answer within {seconds} s", target=self.target,
                                      seconds=format(self.call_deadline_s, "g")))
        elif isinstance(exc, SyncProtocolError):
            error = HopFailure.at(Hop.HTTP, self.target, Text("the platform's answer does not follow the contract: "
                                                              "{error}", error=str(exc)))
        else:
            error = locate_failure(exc, url=str(self.client.base_url), proxy=self.proxy)
        return _CallFailed(error)

    async def call(self, store: StoreLink, method: str, path: str, *, content: bytes | None = None,
                   params: Mapping[str, str] | None = None, headers: Mapping[str, str] | None = None) -> bytes:
        """One call; the answer's body on 2xx, else :class:`_CallFailed`."""
        all_headers = {"Authorization": f"Bearer {store.token}", **(headers or {})}
        if content is not None:
            all_headers["Content-Type"] = "application/json"
        try:
            with trio.fail_after(self.call_deadline_s):
                async with self.client.stream(method, path, content=content, params=params,
                                              headers=all_headers) as response:
                    body = await _read_body(response, ANSWER_MAX_BYTES)
        except (httpx.HTTPError, trio.TooSlowError, SyncProtocolError) as exc:
            raise self._transport(exc) from exc
        if not 200 <= response.status_code < 300:
            raise self._failure(response, body)
        return body

    async def _on_failure(self, store: StoreLink, loop: LoopStatus, pacer: Pacer, failed: _CallFailed,
                          name: str, *, paired_seen: int) -> None:
        if failed.verdict is CallVerdict.REPAIR:
            loop.failed(failed.error, self.clock())
            await mark_repair_needed(self.runtime, store)
            return
        delay = pacer.failure(failed.retry_after_s)
        now = self.clock()
        loop.failed(failed.error, now, now + delay)
        self.runtime.metrics.inc("sync_failures", loop=name, hop=str(failed.error.hop))
        log.warning("cloud %s failed (%s); next try in %.1f s: %s", name, failed.error.hop, delay,
                    failed.error.message)
        await self.pause(delay, since=[(self.runtime.pairing_changes, paired_seen)])

    async def _loop(self, name: str, loop: LoopStatus, once: Callable[[StoreLink], Awaitable[float]], *,
                    wake: ChangeSignal | None = None) -> None:
        """Run ``once`` forever: after a success wait what it returns (or until ``wake``),
        after a failure back off."""
        pacer = self._pacer()
        while True:
            paired_seen = self.runtime.pairing_changes.version
            store = await self.linked()
            woken = [(wake, wake.version)] if wake is not None else []
            try:
                wait_s = await once(store)
            except _CallFailed as failed:
                await self._on_failure(store, loop, pacer, failed, name, paired_seen=paired_seen)
                continue
            pacer.success(0.0)
            now = self.clock()
            loop.ok(now, now + wait_s if wait_s else None)
            if wait_s:
                await self.pause(wait_s, since=woken)

    # -- pull ------------------------------------------------------------------------------

    async def pull_loop(self) -> None:
        # A "resync" (the remote support channel) pulls at once instead of at the interval.
        await self._loop("pull", self.status.pull, self.pull_once, wake=self.runtime.resync_requests)

    async def pull_once(self, store: StoreLink) -> float:
        """Bring the replica up to date (snapshot if needed, then every page of changes)."""
        db = self.runtime.db

        def prepare(conn: Any) -> SyncState:
            if set_store(conn, store.store_id):
                log.info("replica is now of store %s: reading its snapshot", store.store_id)
            return sync_state(conn)

        state = await db.write(prepare)
        cursor = state.cursor
        snapshots = 0
        while True:
            if cursor is None:
                snapshots += 1
                if snapshots > SNAPSHOTS_PER_ROUND_MAX:
                    raise _CallFailed(HopFailure.at(Hop.HTTP, self.target,
                                                   Text("the platform refused the cursor of its own snapshot")))
                cursor = await self.read_snapshot(store)
            try:
                page_body = await self.call(store, "GET", f"/v1/stores/{store.store_id}/changes",
                                            params={"cursor": cursor, "limit": str(min(self.cfg.page_limit, 1000))})
            except _CallFailed as failed:
                if failed.verdict is CallVerdict.GONE or failed.code == "invalid_cursor":
                    log.info("cursor %s refused (%s): reading the snapshot", cursor, failed.code or "410")
                    await db.write(require_snapshot)
                    cursor = None
                    continue
                raise
            try:
                page = parse_changes(page_body)
            except SyncProtocolError as exc:
                raise self._transport(exc) from exc
            writes = [_write_of(c.entity, c.key, c.data, c.seq) for c in page.changes]
            now = self.clock()
            applied = await db.write(partial(apply_changes, writes=writes, cursor=page.cursor, now=now))
            if applied:
                self.runtime.metrics.inc("sync_changes_applied", applied)
            stuck = not page.changes and page.cursor == cursor
            cursor = page.cursor
            if not page.more or stuck:
                return self.cfg.pull_interval_s

    async def read_snapshot(self, store: StoreLink) -> str:
        """Stream the snapshot into staging and swap it in; returns its cursor.

        Reading and staging overlap: parsed batches go through a channel of
        :data:`SNAPSHOT_BATCHES_QUEUED` to one writer task, so the stream is parsed while the
        previous batch is written (the write runs in SQLite's thread). At most that many
        batches, plus the one being filled and the one being written, are in memory.
        """
        db = self.runtime.db
        await db.write(begin_snapshot)
        self.status.snapshot_rows = 0
        log.info("reading the snapshot of store %s", store.store_id)
        send, receive = trio.open_memory_channel[list[SnapshotRecord]](SNAPSHOT_BATCHES_QUEUED)

        async def stage() -> None:
            async with receive:
                async for rows in receive:
                    await db.write(partial(stage_rows, rows=rows))
                    if self.status.snapshot_rows is not None:
                        self.status.snapshot_rows += len(rows)

        failure: _CallFailed | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stage)
                async with send:
                    try:
                        end = await self._stream_snapshot(store, send)
                    except (httpx.HTTPError, trio.TooSlowError, SyncProtocolError) as exc:
                        failure = self._transport(exc)
                        failure.__cause__ = exc
                    except _CallFailed as exc:
                        failure = exc
            if failure is not None:
                raise failure
            swapping = time.perf_counter()
            counts = await db.write(partial(finish_snapshot, cursor=end.cursor, now=self.clock()))
            swap_s = self.last_swap_s = time.perf_counter() - swapping
            await db.write(drop_old_replica)
        finally:
            self.status.snapshot_rows = None
        log.info("snapshot of store %s loaded at cursor %s: %s (the swap held the writer %.0f ms)", store.store_id,
                 end.cursor, ", ".join(f"{n} {e}" for e, n in counts.items()), swap_s * 1000)
        self.runtime.metrics.inc("sync_snapshots")
        return end.cursor

    async def _stream_snapshot(self, store: StoreLink, send: trio.MemorySendChannel[list[SnapshotRecord]],
                               ) -> SnapshotEnd:
        reader = SnapshotReader()
        batch: list[SnapshotRecord] = []
        async with self.client.stream("GET", f"/v1/stores/{store.store_id}/snapshot",
                                      headers={"Authorization": f"Bearer {store.token}"}) as response:
            if response.status_code != 200:
                with trio.fail_after(self.call_deadline_s):
                    body = await _read_body(response, ANSWER_MAX_BYTES)
                raise self._failure(response, body)
            async for chunk in response.aiter_bytes():
                for event in reader.receive_data(chunk):
                    if isinstance(event, SnapshotRecord):
                        batch.append(event)
                if len(batch) >= SNAPSHOT_BATCH_ROWS:
                    await send.send(batch)
                    batch = []
        end = reader.close()
        if batch:
            await send.send(batch)
        return end

    # -- push ------------------------------------------------------------------------------

    def _key_of(self, events: Sequence[OutboxEvent]) -> str:
        return batch_key([(e.id, e.body) for e in events], salt=self.uplink.key_salt)

    async def push_loop(self) -> None:
        last_prune = -PRUNE_INTERVAL_S
        pacer = self._pacer()
        signal = self.runtime.uplink_changes
        while True:
            paired_seen = self.runtime.pairing_changes.version
            store = await self.linked()
            seen = signal.version
            if trio.current_time() - last_prune >= PRUNE_INTERVAL_S:
                last_prune = trio.current_time()
                await self.runtime.db.write(
                    partial(prune_accepted, before=self.clock() - self.cfg.accepted_retention_s))
            try:
                more = await self.push_once(store)
            except _CallFailed as failed:
                await self._on_failure(store, self.status.push, pacer, failed, "push", paired_seen=paired_seen)
                continue
            pacer.success(0.0)
            self.status.push.ok(self.clock())
            if more:
                continue
            # Idle: a new event wakes the loop at once; the timer is the safety net.
            with trio.move_on_after(self.cfg.push_interval_s):
                await signal.wait(seen)

    async def push_once(self, store: StoreLink) -> bool:
        """Send one batch (the one in flight, if any). False when the outbox is empty."""
        db = self.runtime.db
        batch = await db.write(partial(claim_batch, limit=self.uplink.limit, now=self.clock(), key_of=self._key_of))
        if batch is None:
            return False
        content = b'{"events":[' + b",".join(e.body.encode("utf-8") for e in batch.events) + b"]}"
        try:
            body = await self.call(store, "POST", f"/v1/stores/{store.store_id}/events", content=content,
                                   headers={"Idempotency-Key": batch.key})
        except _CallFailed as failed:
            if failed.verdict is not CallVerdict.REFUSED:
                raise
            if self.uplink.refused(len(batch.events), status=failed.error.status or 0, code=failed.code):
                await db.write(partial(reject_batch, key=batch.key, reason=failed.error.message, now=self.clock()))
                log.warning("event %s rejected for good: %s", batch.events[0].id, failed.error.message)
                self.runtime.metrics.inc("sync_events_rejected")
            else:
                await db.write(partial(release_batch, key=batch.key))
            return True
        try:
            answer = parse_events_answer(body)
        except SyncProtocolError as exc:
            raise self._transport(exc) from exc
        accepted, rejected, requeued = await db.write(partial(
            settle_batch, key=batch.key, accepted=answer.accepted, rejected=answer.rejected, now=self.clock()))
        if not accepted and not rejected:
            # An answer about none of the batch: back off instead of resending at once.
            self.uplink.unanswered()
            raise _CallFailed(HopFailure.at(Hop.HTTP, self.target, Text("the platform's answer named none of the "
                                                                       "{count} events sent",
                                                                       count=len(batch.events))))
        self.uplink.sent()
        self.runtime.metrics.inc("sync_events_accepted", accepted)
        if rejected:
            self.runtime.metrics.inc("sync_events_rejected", rejected)
            for event_id, reason in answer.rejected.items():
                log.warning("the platform rejected event %s: %s", event_id, reason)
        if requeued:
            log.warning("%d events of batch %s got no answer; they go again", requeued, batch.key)
        return True

    # -- heartbeat -------------------------------------------------------------------------

    async def heartbeat_loop(self) -> None:
        await self._loop("heartbeat", self.status.heartbeat, self.heartbeat_once)

    async def heartbeat_body(self) -> bytes:
        runtime = self.runtime
        checks = await runtime.health.latest()
        stats = await runtime.db.read(outbox_stats)
        state = await runtime.db.read(sync_state)
        now = self.clock()
        body: dict[str, Any] = {
            "firmware": __version__,
            "uptime_s": round(runtime.uptime_s(), 1),
            "at": rfc3339(now),
            "appliance_id": runtime.appliance_id,
            "health": {"status": str(worst(checks)), "checks": _brief_checks(checks)},
            "queues": {
                "events_pending": stats.queued,
                "events_in_flight": stats.in_flight,
                "events_rejected": stats.rejected,
                "events_oldest_unsent_s": 0 if stats.oldest_unsent_at is None
                else max(0, int(now - stats.oldest_unsent_at)),
            },
            "sync": {"cursor": state.cursor, "lag_s": None if state.last_pull_at is None
                     else round(max(0.0, now - state.last_pull_at), 1)},
            # Firmware updates: the slot, what is under way, the last outcome (docs/updates.md).
            "update": runtime.firmware.report(),
        }
        content = json_text(body).encode("utf-8")
        while len(content) > HEARTBEAT_MAX_BYTES and body["health"]["checks"]:
            body["health"]["checks"] = body["health"]["checks"][: len(body["health"]["checks"]) // 2]
            content = json_text(body).encode("utf-8")
        return content

    async def heartbeat_once(self, store: StoreLink) -> float:
        content = await self.heartbeat_body()
        answer = await self.call(store, "POST", f"/v1/stores/{store.store_id}/heartbeat", content=content)
        try:
            offer = json.loads(answer).get("firmware")
        except (ValueError, AttributeError):  # not JSON, or not an object: no offer in it
            offer = None
        # The firmware the platform offers this box (docs/cloud-contract.md, "Heartbeat");
        # the update service acts on it.
        if self.runtime.firmware.offered(offer):
            self.runtime.firmware_changes.notify()
        return self.cfg.heartbeat_interval_s


def _brief_checks(checks: Sequence[Check]) -> list[dict[str, Any]]:
    """Problems first, messages cut short: the heartbeat is bounded."""
    ordered = sorted(checks, key=lambda c: c.status is Status.OK)
    return [{"name": c.name, "status": str(c.status), "message": c.message[:CHECK_MESSAGE_MAX]}
            for c in ordered[:HEARTBEAT_CHECKS_MAX]]


async def run_sync(runtime: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """The sync service: the three loops until cancelled. Ready at once (it needs no
    network to start); a WAN setting that cannot be used is shown, not raised."""
    cloud = runtime.config.cloud
    register(runtime)
    try:
        target = cloud_route(runtime.config)
        client = client_for(target, connect_timeout_s=cloud.connect_timeout_s, read_timeout_s=cloud.read_timeout_s)
        proxy = target.proxy
    except WanConfigError as exc:
        runtime.sync_status.blocked = str(exc)
        log.error("cloud sync cannot start: %s", exc)
        task_status.started()
        await trio.sleep_forever()
    try:
        async with trio.open_nursery() as nursery:
            sync = CloudSync(runtime, client, proxy=proxy)
            nursery.start_soon(sync.pull_loop)
            nursery.start_soon(sync.push_loop)
            nursery.start_soon(sync.heartbeat_loop)
            task_status.started()
    finally:
        await close_client(client)

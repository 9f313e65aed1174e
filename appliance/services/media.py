"""The media fetcher: keeps a verified local copy of every file the replica's manifest lists.

Each round (:meth:`MediaFetcher.scan`) compares the manifest with the cache and plans
under the disk budget (the walk of :func:`appliance.protocol.media_cache.plan`, order in
docs/media.md): files no longer wanted are evicted, then the missing ones are downloaded,
:data:`~appliance.config.MediaConfig` ``concurrency`` at a time, all sharing one rate limit.
The manifest stays in the database: the walk reads it one blob at a time in the plan's
order, and a round takes at most :data:`FETCH_MAX` files, so the fetcher's memory does not
grow with the catalog (a 100k-entry manifest held as objects took ~140 MiB).

A download goes to ``partial/<sha256>`` through the WAN client (the box's proxy, CA and
timeouts), with the shared resumable download (``appliance.services.download``, which the
firmware updates use too). A cut download resumes with ``Range`` and ``If-Match: <etag>``
(blob storage has no If-Range); 412 means the file changed: start again from 0. Once the size and the
sha256 match, the file is fsynced and renamed into ``blobs/``, and only then does the
database serve the entry's keys from it; a changed entry keeps serving its previous file
until then. Bytes that do not match are deleted and fetched again after a backoff.

Failures are located on their hop (DNS, TCP, proxy, TLS, HTTP) and kept in the status for
the homepage and health. Cancellation: a download stops between chunks; its partial file
stays for the next run. A database write already started completes.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Set
from functools import partial
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import attrs
import httpx
import trio

from appliance.config import Config
from appliance.protocol.backoff import Backoff
from appliance.protocol.media import MediaEntry, RateLimit, parse_entry
from appliance.protocol.media_cache import Blob, BudgetWalk, budget_bytes
from appliance.protocol.text import Text
from appliance.protocol.wan import Hop, HopFailure
from appliance.services.download import DownloadError, receive, request_headers
from appliance.services.media_files import MediaShelf, hash_file
from appliance.services.media_health import register
from appliance.services.media_through import pass_through
from appliance.services.runtime import Runtime
from appliance.services.wan import (
    ProxySettings,
    Route,
    WanConfigError,
    client_for,
    close_client,
    locate_failure,
    parse_proxy,
    route,
    ssl_context,
)
from appliance.storage import media as rows

__all__ = ["FETCH_MAX", "MediaFetcher", "Walked", "run_media", "walk_plan"]

log = logging.getLogger(__name__)

# A fill round ends after this long (downloads in progress are cut and resumed with Range
# in the next round), so a long first fill still sees the catalog's changes, evicts and
# writes out serve times every minute.
ROUND_MAX_S: Final = 60.0
# Rate-limit burst: one read's worth, so the average holds from the first second.
RATE_BURST_BYTES: Final = 64 * 1024
# The most files one scan hands to a fill round (in the plan's order; the next scan, at the
# round's end, takes the next ones): more than a round of ROUND_MAX_S downloads.
FETCH_MAX: Final = 1000
# The most keys one scan points at their cached files, or stops serving (the rest: the next scan).
KEYS_MAX: Final = 5000


@attrs.define
class Walked:
    """What one scan found, reading the manifest one blob at a time (in a worker thread)."""

    budget: int
    fetch: list[Blob] = attrs.field(factory=list)
    entries: dict[str, MediaEntry] = attrs.field(factory=dict)  # sha256 -> the entry to fetch it by
    evict: list[tuple[str, int]] = attrs.field(factory=list)  # (sha256, size) of cached files to delete
    point: list[tuple[str, str]] = attrs.field(factory=list)
    drop: list[str] = attrs.field(factory=list)
    wanted_missing: set[str] = attrs.field(factory=set)  # of the shas asked about: kept, not cached
    cached_bytes: int = 0
    files_wanted: int = 0
    bytes_wanted: int = 0
    files_missing: int = 0
    bytes_missing: int = 0
    over_budget: int = 0  # entries left out for the budget
    over_budget_bytes: bool = False  # the manifest's blobs do not all fit: the order decides

    @property
    def settled(self) -> bool:
        """Nothing to do: the next walk finds the same until something it reads changes."""
        return not (self.fetch or self.evict or self.point or self.drop)


def _unusable(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """``(key, why)`` of every manifest entry that cannot be used, one row at a time."""
    bad = []
    for key, text in rows.manifest_rows(conn):
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("an entry must be a JSON object")
            parse_entry(key, data)
        except ValueError as exc:  # MediaEntryError, or JSON that is not an entry
            bad.append((key, str(exc)))
    return bad


class _Failed(Exception):
    def __init__(self, error: HopFailure, *, retry_now: bool = False) -> None:
        self.error, self.retry_now = error, retry_now
        super().__init__(error.message)


def blob_route(config: Config, url: str) -> Route:
    """The WAN route to a blob storage origin (``https://account.blob.core.windows.net``)."""
    return route(url, config.wan, ca_file=config.cloud.ca_file)


def _media_failure(url: str, message: str, fix: str, status: int | None = None) -> HopFailure:
    parts = urlsplit(url)
    return HopFailure(hop=Hop.HTTP, target=f"{parts.hostname}:{parts.port or 443}", message=message, fix=fix,
                     status=status)


def walk_plan(conn: sqlite3.Connection, *, bad: Set[str], budget: int, waiting: Set[str] = frozenset(),
              asked: Set[str] = frozenset()) -> Walked:
    """The plan (:func:`appliance.protocol.media_cache.plan`'s walk), reading the manifest one
    blob at a time in the plan's order: memory bounded by :data:`FETCH_MAX`, not the catalog.
    In one read transaction (a worker thread). ``budget``: bytes the cache may hold
    (:func:`~appliance.protocol.media_cache.budget_bytes`); ``bad``: keys whose entries cannot be used;
    ``waiting``: files in backoff, not fetched now; ``asked``: files whose being wanted and
    missing the caller needs to know (:attr:`Walked.wanted_missing`)."""
    unusable = sorted(bad)
    cached_total = rows.cached_bytes(conn)
    w = Walked(budget=budget)
    # A changed entry keeps its previous file until the new one is verified.
    serving_old = rows.still_serving(conn, unusable)
    walk = BudgetWalk(w.budget)
    for row in rows.plan_rows(conn, unusable):
        w.files_wanted += row.entries
        w.bytes_wanted += row.entry_bytes
        kept = walk.take(row.size)
        cached = row.cached_size is not None
        if kept and not cached:
            if row.sha256 in asked:
                w.wanted_missing.add(row.sha256)
            if row.sha256 not in waiting and len(w.fetch) < FETCH_MAX:
                w.entries[row.sha256] = parse_entry(row.first_key, json.loads(row.first_data))
                w.fetch.append(Blob(sha256=row.sha256, size=row.size, keys=tuple(sorted(json.loads(row.keys))),
                                    pinned=row.pinned, last_served_at=row.last_served_at))
        elif not kept and cached and row.sha256 not in serving_old:
            w.evict.append((row.sha256, row.cached_size or 0))
        if not (cached and (kept or row.sha256 in serving_old)):
            w.files_missing += row.entries
            w.bytes_missing += row.entry_bytes
            if not kept:
                w.over_budget += row.entries
    w.over_budget_bytes = walk.wanted > walk.budget
    # Files the manifest no longer lists go first of all.
    w.evict[:0] = [(sha, size) for sha, size in rows.unlisted_blobs(conn, unusable) if sha not in serving_old]
    w.cached_bytes = cached_total - sum(size for _, size in w.evict)
    evicted = {sha for sha, _ in w.evict}
    w.point = [(key, sha) for key, sha in rows.keys_to_point(conn, unusable, KEYS_MAX) if sha not in evicted]
    w.drop = rows.keys_to_drop(conn, unusable, KEYS_MAX)
    return w


class MediaFetcher:
    def __init__(self, runtime: Runtime, shelf: MediaShelf, *, clock: Callable[[], float] = time.time) -> None:
        self.runtime = runtime
        self.config = runtime.config.media
        self.shelf = shelf
        self.status = shelf.status
        self.clock = clock
        self.limit = RateLimit(rate=self.config.max_rate, burst=max(RATE_BURST_BYTES, self.config.max_rate // 4),
                               now=trio.current_time())
        self._clients: dict[str, tuple[httpx.AsyncClient, ProxySettings | None]] = {}
        self._backoff: dict[str, tuple[Backoff, float]] = {}  # sha256 -> (backoff, next attempt, trio time)
        # The manifest's entries that cannot be used (usually none), found once per change.
        self._bad: frozenset[str] = frozenset()
        # The entries of the files the last scan handed to the fill (at most FETCH_MAX).
        self._window: dict[str, MediaEntry] = {}
        self._seen_change: float | None = -1.0
        # Walking a 100k manifest takes a second or two of CPU: a scan whose inputs are those
        # of the last walk that found nothing to do skips it (every scan_interval_s, idle).
        self._changes = 0  # files placed or evicted, and serve times that reorder the plan
        self._settled: tuple[object, ...] | None = None
        self._over_budget = False
        # Verified files waiting for their database rows: written in one transaction per
        # flush (group commit), so a fill of many small files is not one fsync per file.
        self._unrecorded: list[tuple[str, int, tuple[str, ...]]] = []
        self._record_lock = trio.Lock()

    async def aclose(self) -> None:
        for client, _ in self._clients.values():
            await close_client(client)
        self._clients.clear()

    # --- start-up --------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Make the database and ``blobs/`` agree: a file without a row (a crash between its
        rename and its row) is hashed again and adopted or deleted; a row without a file goes."""
        files = await trio.to_thread.run_sync(self.shelf.files)
        known = await self.runtime.db.read(rows.blobs)
        adopted = {}
        for sha, size in files.items():
            if sha not in known and await trio.to_thread.run_sync(self.shelf.verify, sha):
                adopted[sha] = size
        gone = [sha for sha in known if sha not in files]
        now = self.clock()

        def write(conn: sqlite3.Connection) -> None:
            for sha, size in adopted.items():
                rows.add_blob(conn, sha, size, now=now)
            rows.forget_blobs(conn, gone)

        await self.runtime.db.write(write)
        if adopted or gone:
            log.info("media: adopted %d verified file(s), dropped %d missing", len(adopted), len(gone))

    # --- one round -------------------------------------------------------------------------

    async def _check_manifest(self) -> None:
        """Find the entries that cannot be used, once per change of the replica."""
        changed_at = await self.runtime.db.read(rows.replica_changed_at)
        if changed_at == self._seen_change:
            return
        bad = await self.runtime.db.read(_unusable)
        for key, why in bad:
            log.warning("media: entry %r cannot be used: %s", key, why)
        self._bad = frozenset(key for key, _ in bad)
        self.status.bad_entries = len(bad)
        self._seen_change = changed_at

    async def scan(self) -> tuple[Blob, ...]:
        """Plan against the manifest, write out serve times, point keys at their files, evict;
        the files to fetch now, in the plan's order (at most :data:`FETCH_MAX`)."""
        await self._check_manifest()
        served = self.shelf.take_served()
        if served:
            await self.runtime.db.write(lambda conn: rows.mark_served(conn, served))
            if self._over_budget:  # serve times order what is kept only when not everything fits
                self._changes += 1
        free = await trio.to_thread.run_sync(self.shelf.free_bytes)
        partials = await trio.to_thread.run_sync(self.shelf.partial_names)
        budget = budget_bytes(max_bytes=self.config.max_bytes, min_free_bytes=self.config.min_free_bytes,
                              cached_bytes=await self.runtime.db.read(rows.cached_bytes), free_bytes=free)
        now = trio.current_time()
        waiting = frozenset(sha for sha, (_, at) in self._backoff.items() if at > now)
        inputs = (self._seen_change, self._changes, waiting, partials, budget)
        if inputs == self._settled:
            self.status.last_scan_at = self.clock()
            return ()
        asked = partials | frozenset(self._backoff)
        walked = await self.runtime.db.read(partial(walk_plan, bad=self._bad, budget=budget, waiting=waiting,
                                                    asked=asked))
        self._settled = inputs if walked.settled else None
        self._over_budget = walked.over_budget_bytes
        evict = [sha for sha, _ in walked.evict]
        if walked.point or walked.drop or evict:
            def write(conn: sqlite3.Connection) -> None:
                rows.forget_blobs(conn, evict)
                rows.set_key_blobs(conn, dict(walked.point), drop=walked.drop)

            await self.runtime.db.write(write)
            self._changes += 1
            for sha in evict:
                await trio.to_thread.run_sync(self.shelf.remove, sha)
            if evict:
                log.info("media: evicted %d file(s)", len(evict))
        # Downloads in progress no longer wanted (not one being written now: a reader's
        # pass-through may have begun since the listing).
        unwanted = partials - walked.wanted_missing - self.shelf.busy
        if unwanted:
            await trio.to_thread.run_sync(self.shelf.drop_partials, unwanted)
        self._backoff = {sha: v for sha, v in self._backoff.items() if sha in walked.wanted_missing}
        self._window = walked.entries
        self._update_status(walked)
        return tuple(walked.fetch)

    def _update_status(self, w: Walked) -> None:
        st = self.status
        st.files_wanted = w.files_wanted
        st.bytes_wanted = w.bytes_wanted
        st.files_cached = w.files_wanted - w.files_missing
        st.bytes_cached = w.cached_bytes
        st.files_missing = w.files_missing
        st.bytes_missing = w.bytes_missing
        st.over_budget = w.over_budget
        st.budget_bytes = w.budget
        st.failing = len(self._backoff)
        st.last_scan_at = self.clock()
        if not self._backoff and st.files_missing == st.over_budget:
            st.last_error = None

    def due(self, fetch: tuple[Blob, ...]) -> list[Blob]:
        now = trio.current_time()
        return [b for b in fetch if self._backoff.get(b.sha256, (None, 0.0))[1] <= now]

    def next_wake(self) -> float:
        """Seconds until the next scan: the scan interval, or sooner for a retry that is due."""
        soonest = min((at for _, at in self._backoff.values()), default=float("inf"))
        return max(0.0, min(self.config.scan_interval_s, soonest - trio.current_time()))

    async def fill(self, blobs: list[Blob], *, round_s: float | None = None) -> None:
        """Download ``blobs``, ``concurrency`` at a time, for at most ``round_s``; what is
        left resumes in the next round. The progress counts on over rounds until a scan
        finds nothing to do (:meth:`idle`)."""
        st = self.status
        if not st.fill_total_bytes:
            st.fill_total_bytes = sum(b.size for b in blobs)
            st.fill_done_bytes = 0
        # ``concurrency`` workers taking the blobs in order from one iterator: a task per
        # blob waiting its turn took ~5 KiB each, 450 MiB for a 100k catalog's first fill.
        todo = iter(blobs)

        async def worker() -> None:
            for blob in todo:
                await self._fetch_one(blob)

        with trio.move_on_after(ROUND_MAX_S if round_s is None else round_s):
            async with trio.open_nursery() as nursery:
                for _ in range(min(self.config.concurrency, len(blobs))):
                    nursery.start_soon(worker)

    def idle(self) -> None:
        """Nothing to download now: the fill is over."""
        self.status.fill_total_bytes = self.status.fill_done_bytes = 0

    async def _fetch_one(self, blob: Blob) -> None:
        entry = self._window.get(blob.sha256)
        if entry is None:
            return
        if blob.sha256 in self.shelf.busy:  # a reader's pass-through is fetching it now
            return
        self.shelf.busy.add(blob.sha256)
        self.status.downloading.append(entry.key)
        try:
            for attempt in range(2):  # a 412 (the file changed) starts again from 0 once, at once
                try:
                    await self.download(entry, blob)
                    self._backoff.pop(blob.sha256, None)
                    return
                except _Failed as failed:
                    if failed.retry_now and attempt == 0:
                        continue
                    self._failed(entry, blob, failed.error)
                    return
        finally:
            self.status.downloading.remove(entry.key)
            self.shelf.busy.discard(blob.sha256)

    def _failed(self, entry: MediaEntry, blob: Blob, error: HopFailure) -> None:
        backoff, _ = self._backoff.get(blob.sha256, (None, 0.0))
        if backoff is None:
            backoff = Backoff(self.config.backoff_initial_s, max(self.config.backoff_initial_s,
                                                                 self.config.backoff_max_s))
        self._backoff[blob.sha256] = (backoff, trio.current_time() + backoff.next_delay())
        st = self.status
        st.last_error, st.last_error_key, st.last_error_at = error, entry.key, self.clock()
        st.failing = len(self._backoff)
        log.warning("media: %s: %s", entry.key, error.message)

    # --- one download ----------------------------------------------------------------------

    def client(self, url: str) -> tuple[httpx.AsyncClient, ProxySettings | None]:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        if origin not in self._clients:
            cloud = self.runtime.config.cloud
            target = blob_route(self.runtime.config, origin)
            client = client_for(target, connect_timeout_s=cloud.connect_timeout_s, read_timeout_s=cloud.read_timeout_s)
            self._clients[origin] = (client, target.proxy)
        return self._clients[origin]

    async def download(self, entry: MediaEntry, blob: Blob) -> None:
        """Fetch (or resume) one file, verify it and put it in place; :class:`_Failed` if not."""
        shelf, sha, size = self.shelf, entry.sha256, entry.size
        have, etag, free = await trio.to_thread.run_sync(shelf.partial_state, sha)
        if have > size or (have and not etag):
            await trio.to_thread.run_sync(shelf.drop_partial, sha)
            have, etag = 0, ""
        if free - (size - have) < self.config.min_free_bytes:
            raise _Failed(HopFailure(hop=Hop.HTTP, target="disk", status=None,
                                    message=Text("{key} ({size} bytes) would leave less free disk than {floor} bytes",
                                                 key=entry.key, size=size, floor=self.config.min_free_bytes),
                                    fix=Text("free disk space, or lower [media] max_bytes")))
        headers = request_headers(have, etag)
        if not have or have < size:  # a complete partial (a crash before its rename) is only checked
            client, proxy = self.client(entry.url)
            try:
                async with client.stream("GET", entry.url, headers=headers) as response:
                    have = await self._receive(entry, response, have)
            except httpx.HTTPError as exc:
                raise _Failed(locate_failure(exc, url=entry.url, proxy=proxy)) from exc
        if have != size:
            raise _Failed(_media_failure(entry.url, Text("{key}: the download stopped at {have} of {size} bytes",
                                                         key=entry.key, have=have, size=size),
                                         Text("the box resumes it by itself; check the internet link if it persists")))
        digest, _ = await trio.to_thread.run_sync(hash_file, shelf.partial_path(sha))
        if digest.hexdigest() != sha:
            await trio.to_thread.run_sync(shelf.drop_partial, sha)
            self.status.hash_failures += 1
            raise _Failed(_media_failure(entry.url, Text("{key}: the bytes received do not match its sha256; "
                                                         "deleted, to be fetched again", key=entry.key),
                                         Text("the box fetches it again by itself; tell support if it persists")))
        # From here the file is put in place and recorded even if the round ends meanwhile.
        with trio.CancelScope(shield=True):
            await self.place(entry, blob, sha, size)
        self.status.fetched += 1
        log.debug("media: cached %s (%d bytes)", entry.key, size)

    async def place(self, entry: MediaEntry, blob: Blob, sha: str, size: int) -> None:
        """Rename the verified file into place and write its rows (bounded: an fsync and a write)."""
        pause = self.config.testing.pause_at_rename_s / 2
        if pause:
            await trio.sleep(pause)
        await trio.to_thread.run_sync(self.shelf.place, sha)
        if pause:
            await trio.sleep(pause)
        self._unrecorded.append((sha, size, blob.keys))
        await self._record()

    async def _record(self) -> None:
        """Write the rows of every verified file waiting for one, in one transaction. A caller
        that finds its row already written by another flush returns at once."""
        async with self._record_lock:
            batch, self._unrecorded = self._unrecorded, []
            if not batch:
                return
            now = self.clock()
            bad = self._bad

            def record(conn: sqlite3.Connection) -> None:
                for sha, size, keys in batch:
                    rows.add_blob(conn, sha, size, now=now)
                    # Served from this file: the keys whose entry names these bytes now.
                    rows.set_key_blobs(conn, {k: sha for k in rows.keys_listing(conn, keys, sha) if k not in bad})

            await self.runtime.db.write(record)
            self._changes += 1

    async def _receive(self, entry: MediaEntry, response: httpx.Response, have: int) -> int:
        """Write the answer's body after the ``have`` bytes already there; the new total
        (the shared resumable download, ``appliance.services.download``)."""

        async def on_chunk(n: int) -> None:
            self.status.fill_done_bytes += n
            wait = self.limit.take(n, trio.current_time())
            if wait:
                await trio.sleep(wait)

        try:
            return await receive(response, self.shelf.partial_path(entry.sha256), name=entry.key, have=have,
                                 size=entry.size, on_chunk=on_chunk)
        except DownloadError as exc:
            if exc.oversize:
                self.status.hash_failures += 1
            fix = (Text("the box retries by itself; if the file stays missing, tell support")
                   if not exc.restart and not exc.oversize else
                   Text("the box fetches it again by itself") if exc.oversize else Text("nothing to do"))
            raise _Failed(_media_failure(entry.url, exc.message, fix, exc.status), retry_now=exc.restart) from exc


async def run_media(runtime: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """The media service: the shelf on disk, then rounds of scan and fill until cancelled."""
    shelf = MediaShelf(root=Path(runtime.config.storage.dir) / "media")
    await trio.to_thread.run_sync(shelf.prepare)
    runtime.media = shelf
    register(runtime)
    fetcher = MediaFetcher(runtime, shelf)
    if runtime.config.media.pass_through:
        shelf.pass_through = partial(pass_through, fetcher)
    try:
        # A proxy or CA file that cannot be used: say so, keep serving what is cached.
        parse_proxy(runtime.config.wan.proxy)
        ssl_context(runtime.config.cloud.ca_file)
    except WanConfigError as exc:
        shelf.status.blocked = str(exc)
    await fetcher.reconcile()
    task_status.started()
    try:
        while True:
            fetch = await fetcher.scan()
            due = fetcher.due(fetch) if not shelf.status.blocked else []
            if due:
                await fetcher.fill(due)
                continue
            if not shelf.status.failing:
                fetcher.idle()
            await trio.sleep(fetcher.next_wake())
    finally:
        await fetcher.aclose()

"""The media fetcher: keeps a verified local copy of every file the replica's manifest lists.

Each round (:meth:`MediaFetcher.scan`) compares the manifest with the cache and plans
under the disk budget (:func:`appliance.protocol.media_cache.plan`, order in
docs/media.md): files no longer wanted are evicted, then the missing ones are downloaded,
:data:`~appliance.config.MediaConfig` ``concurrency`` at a time, all sharing one rate limit.

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

import logging
import sqlite3
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import httpx
import trio

from appliance.config import Config
from appliance.protocol.backoff import Backoff
from appliance.protocol.media import MediaEntry, MediaEntryError, RateLimit, parse_entry
from appliance.protocol.media_cache import Blob, CachePlan, budget_bytes, plan
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

__all__ = ["MediaFetcher", "run_media"]

log = logging.getLogger(__name__)

# A fill round ends after this long (downloads in progress are cut and resumed with Range
# in the next round), so a long first fill still sees the catalog's changes, evicts and
# writes out serve times every minute.
ROUND_MAX_S: Final = 60.0
# Rate-limit burst: one read's worth, so the average holds from the first second.
RATE_BURST_BYTES: Final = 64 * 1024


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
        self._entries: dict[str, MediaEntry] = {}
        self._pinned: frozenset[str] = frozenset()
        self._seen_change: float | None = -1.0
        # Verified files waiting for their database rows: written in one transaction per
        # flush (group commit), so a fill of many small files is not one fsync per file.
        self._unrecorded: list[tuple[str, int, dict[str, str]]] = []
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

    async def _load_manifest(self) -> None:
        changed_at = await self.runtime.db.read(rows.replica_changed_at)
        if changed_at == self._seen_change:
            return
        manifest = await self.runtime.db.read(rows.manifest)
        self._pinned = await self.runtime.db.read(rows.pinned_keys)
        entries: dict[str, MediaEntry] = {}
        bad = 0
        for key, data in manifest:
            try:
                entries[key] = parse_entry(key, data)
            except MediaEntryError as exc:
                bad += 1
                log.warning("media: entry %r cannot be used: %s", key, exc)
        self._entries = entries
        self.status.bad_entries = bad
        self._seen_change = changed_at

    async def scan(self) -> CachePlan:
        """Plan against the manifest, write out serve times, point keys at their files, evict."""
        await self._load_manifest()
        served = self.shelf.take_served()
        if served:
            await self.runtime.db.write(lambda conn: rows.mark_served(conn, served))
        cached = await self.runtime.db.read(rows.blobs)
        serving = await self.runtime.db.read(rows.key_blobs)
        free = await trio.to_thread.run_sync(self.shelf.free_bytes)
        cached_bytes = sum(size for size, _ in cached.values())
        budget = budget_bytes(max_bytes=self.config.max_bytes, min_free_bytes=self.config.min_free_bytes,
                              cached_bytes=cached_bytes, free_bytes=free)
        entries = list(self._entries.values())
        the_plan = plan(entries, pinned=self._pinned, cached={s: v[0] for s, v in cached.items()},
                        last_served={s: v[1] for s, v in cached.items()}, budget=budget)
        # A changed entry keeps its previous file until the new one is verified.
        still_serving = {sha for key, sha in serving.items()
                         if key in self._entries and self._entries[key].sha256 != sha
                         and self._entries[key].sha256 not in cached}
        evict = sorted(the_plan.evict - still_serving)
        point = {e.key: e.sha256 for e in entries
                 if e.sha256 in cached and e.sha256 not in evict and serving.get(e.key) != e.sha256}
        drop = [key for key in serving if key not in self._entries]
        if point or drop or evict:
            def write(conn: sqlite3.Connection) -> None:
                rows.forget_blobs(conn, evict)
                rows.set_key_blobs(conn, point, drop=drop)

            await self.runtime.db.write(write)
            for sha in evict:
                await trio.to_thread.run_sync(self.shelf.remove, sha)
            if evict:
                log.info("media: evicted %d file(s)", len(evict))
        keep = {b.sha256 for b in the_plan.fetch}
        await trio.to_thread.run_sync(self.shelf.prune_partials, keep)
        self._backoff = {sha: v for sha, v in self._backoff.items() if sha in keep}
        self._update_status(the_plan, entries, cached, evict, budget)
        return the_plan

    def _update_status(self, the_plan: CachePlan, entries: list[MediaEntry], cached: dict[str, tuple[int, float]],
                       evicted: list[str], budget: int) -> None:
        st = self.status
        held = {sha: size for sha, (size, _) in cached.items() if sha not in evicted}
        st.files_wanted = len(entries)
        st.bytes_wanted = sum(e.size for e in entries)
        missing = [e for e in entries if e.sha256 not in held]
        st.files_cached = len(entries) - len(missing)
        st.bytes_cached = sum(held.values())
        st.files_missing = len(missing)
        st.bytes_missing = sum(e.size for e in missing)
        left = {b.sha256 for b in the_plan.left_out}
        st.over_budget = sum(1 for e in missing if e.sha256 in left)
        st.budget_bytes = budget
        st.failing = len(self._backoff)
        st.last_scan_at = self.clock()
        if not self._backoff and st.files_missing == st.over_budget:
            st.last_error = None

    def due(self, the_plan: CachePlan) -> list[Blob]:
        now = trio.current_time()
        return [b for b in the_plan.fetch if self._backoff.get(b.sha256, (None, 0.0))[1] <= now]

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
        entry = next((self._entries[k] for k in blob.keys if k in self._entries), None)
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
        keys = {k: sha for k in blob.keys if k in self._entries and self._entries[k].sha256 == sha}
        self._unrecorded.append((sha, size, keys))
        await self._record()

    async def _record(self) -> None:
        """Write the rows of every verified file waiting for one, in one transaction. A caller
        that finds its row already written by another flush returns at once."""
        async with self._record_lock:
            batch, self._unrecorded = self._unrecorded, []
            if not batch:
                return
            now = self.clock()

            def record(conn: sqlite3.Connection) -> None:
                for sha, size, keys in batch:
                    rows.add_blob(conn, sha, size, now=now)
                    rows.set_key_blobs(conn, keys)

            await self.runtime.db.write(record)

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
            the_plan = await fetcher.scan()
            due = fetcher.due(the_plan) if not shelf.status.blocked else []
            if due:
                await fetcher.fill(due)
                continue
            if not shelf.status.failing:
                fetcher.idle()
            await trio.sleep(fetcher.next_wake())
    finally:
        await fetcher.aclose()

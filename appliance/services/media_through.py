"""Pass-through (``[media] pass_through = true``): a file not cached yet is streamed to the
reader while it is downloaded and cached, instead of a 503.

The reader gets the whole file (a ``Range`` is ignored, as RFC 9110 allows) with its
``Content-Length``. Every chunk is written to the partial file and hashed as it goes; the
**last chunk is held back** until the size and the sha256 match. If they do not (or the
download breaks), the connection is cut before the last chunk: the reader sees an
incomplete answer, never a complete wrong file, and nothing is cached. If they match, the
file is put in place exactly as the fetcher does, then the last chunk goes out.

One download per file: a file the fetcher is downloading right now answers 503 with
``Retry-After`` (it will be cached shortly). A WAN that does not answer within
:data:`ANSWER_TIMEOUT_S` also gives 503. No rate limit: a person is waiting.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import MutableMapping
from typing import Any, Final, Protocol

import httpx
import trio
from starlette.types import Send

from appliance.protocol.media import MediaEntry
from appliance.protocol.media_cache import Blob, MediaStatus
from appliance.services.media_files import MediaShelf

__all__ = ["ANSWER_TIMEOUT_S", "MediaFetcher", "pass_through"]

log = logging.getLogger(__name__)

# How long a reader waits for blob storage's answer before getting a 503.
ANSWER_TIMEOUT_S: Final = 5.0
RETRY_AFTER_S: Final = 10


class MediaFetcher(Protocol):
    """What pass-through needs of the fetcher (``appliance.services.media.MediaFetcher``)."""

    shelf: MediaShelf
    status: MediaStatus

    def client(self, url: str) -> tuple[httpx.AsyncClient, Any]: ...

    async def place(self, entry: MediaEntry, blob: Blob, sha: str, size: int) -> None: ...


async def _unavailable(send: Send, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", str(RETRY_AFTER_S).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def pass_through(fetcher: MediaFetcher, entry: MediaEntry, send: Send, headers: list[tuple[bytes, bytes]]
                       ) -> None:
    """Answer one reader with ``entry``'s bytes while caching them (see the module's words)."""
    shelf, sha = fetcher.shelf, entry.sha256
    if sha in shelf.busy:
        await _unavailable(send, f"{entry.key} is being downloaded; try again shortly")
        return
    shelf.busy.add(sha)
    started = False

    async def tracked(message: MutableMapping[str, Any]) -> None:
        nonlocal started
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        await trio.to_thread.run_sync(shelf.drop_partial, sha)
        client, _ = fetcher.client(entry.url)
        with trio.CancelScope(deadline=trio.current_time() + ANSWER_TIMEOUT_S) as waiting:
            await _answer(fetcher, entry, tracked, headers=headers, client=client, waiting=waiting)
        if waiting.cancelled_caught:
            await _unavailable(send, f"{entry.key} is not cached and blob storage did not answer in time")
    except httpx.HTTPError as exc:
        # Before the answer began: a 503. After: returning cuts the connection mid-body.
        log.warning("media: pass-through of %s failed: %s", entry.key, exc)
        if not started:
            await _unavailable(send, f"{entry.key} is not cached and blob storage cannot be reached")
    finally:
        shelf.busy.discard(sha)


async def _answer(fetcher: MediaFetcher, entry: MediaEntry, send: Send, *, headers: list[tuple[bytes, bytes]],
                  client: httpx.AsyncClient, waiting: trio.CancelScope) -> None:
    async with client.stream("GET", entry.url, headers={"Accept-Encoding": "identity"}) as response:
        waiting.deadline = math.inf  # the answer came: from here the body takes what it takes
        if response.status_code != 200:
            await _unavailable(send, f"{entry.key} is not cached and blob storage answered HTTP "
                                     f"{response.status_code}")
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*headers, (b"content-length", str(entry.size).encode())]})
        if await _relay(fetcher, entry, response, send):
            log.info("media: %s streamed through and cached", entry.key)


async def _relay(fetcher: MediaFetcher, entry: MediaEntry, response: httpx.Response, send: Send) -> bool:
    """Copy the body to the reader and the partial file; send the last chunk only if the
    file is verified (True). False: the answer was cut before its end."""
    shelf, sha = fetcher.shelf, entry.sha256
    digest = hashlib.sha256()
    held = b""
    total = 0
    f = await trio.to_thread.run_sync(lambda: shelf.partial_path(sha).open("wb"))
    try:
        async for chunk in response.aiter_raw():
            total += len(chunk)
            if total > entry.size:
                break
            await trio.to_thread.run_sync(f.write, chunk)
            digest.update(chunk)
            if held:
                await send({"type": "http.response.body", "body": held, "more_body": True})
            held = chunk
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(f.close)
    if total != entry.size or digest.hexdigest() != sha:
        await trio.to_thread.run_sync(shelf.drop_partial, sha)
        fetcher.status.hash_failures += total == entry.size
        log.warning("media: pass-through of %s cut: %d of %d bytes, sha256 %s", entry.key, total, entry.size,
                    "wrong" if total == entry.size else "not checked")
        return False  # no final message: the server cuts the connection, the reader sees it incomplete
    blob = Blob(sha256=sha, size=entry.size, keys=(entry.key,), pinned=False, last_served_at=0.0)
    with trio.CancelScope(shield=True):
        await fetcher.place(entry, blob, sha, entry.size)
    await send({"type": "http.response.body", "body": held, "more_body": False})
    return True

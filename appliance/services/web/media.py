"""The media listener (port 8002): the store's cached images, videos and documents.

``GET``/``HEAD /media/{key}``: ``key`` is the catalog key (``products/SKU-000001.jpg``),
looked up in the replica's manifest; the file served is the verified one named by its
sha256, so no key can name any other path. Answers (docs/media.md):

- 200 with the entry's content type, ``ETag`` (the sha256), ``Cache-Control`` and
  ``Accept-Ranges``; 304 for a matching ``If-None-Match``; 206 for one ``Range`` (video
  seeking), 416 for a range past the end; a list of ranges gets the whole file.
- 404 for a key the catalog does not list; 503 with ``Retry-After`` for a listed file not
  cached yet; 401 when a credential (a device signature or the admin token) is needed
  (:func:`may_read`).

Bodies are streamed in :data:`CHUNK_BYTES` pieces read in a worker thread into buffers
of a shared pool (:class:`ReadBuffers`), never whole: memory stays bounded whatever the
number of readers. hypercorn offers neither ASGI ``zerocopysend`` nor ``pathsend``, so
``sendfile`` is not available on this stack. An open file keeps its bytes even if it is
evicted meanwhile.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import Final

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from appliance.protocol.media import ByteRange, MediaEntry, MediaEntryError, etag_matches, parse_entry, parse_range
from appliance.services.runtime import Runtime
from appliance.services.web.common import ApiError, json_error, service_app
from appliance.services.web.device_auth import authenticate
from appliance.services.web.kit import JsonResponse
from appliance.services.web.parts import WebParts
from appliance.storage import media as rows

__all__ = ["CHUNK_BYTES", "ReadBuffers", "create_app", "may_read"]

# Bytes per read and per send: large enough that the worker-thread trip per chunk is
# noise next to the copy (measured with ``scripts/bench media``: 128 KiB chunks served
# half as fast as 1 MiB).
CHUNK_BYTES: Final = 1024 * 1024
# Chunks being read or sent at once, over all readers: bounds the memory a crowd of
# readers can take (about 12 MB) whatever its size; the others wait their turn.
BUFFERS: Final = 12
# Retry-After for a file not cached yet: a small image arrives within seconds.
NOT_CACHED_RETRY_S: Final = 30


async def may_read(request: Request, runtime: Runtime, entry: MediaEntry) -> None:
    """Whether this request may read ``entry``: the one place that decides (docs/media.md).

    ``[media] access = "lan"`` (the default): anyone on the shop's LAN reads what the
    platform does not mark private, so a kiosk's ``<img src>`` works. Private entries, and
    every entry with ``access = "device"``, need a credential: an adopted device's signed
    request or the admin token. Raises ApiError (401, 403, 429) otherwise.
    """
    if runtime.config.media.access == "lan" and not entry.private:
        return
    await authenticate(request, runtime)


class ReadBuffers:
    """A pool of :data:`BUFFERS` reusable read buffers: a chunk is read into one (no new
    allocation per chunk, in whatever thread) and it is given back once the chunk is sent."""

    def __init__(self) -> None:
        self._free: list[bytearray] = []
        self._slots = trio.Semaphore(BUFFERS)

    async def read_and_send(self, fd: int, offset: int, length: int, send: Send, *, more: bool) -> int:
        """Read up to ``length`` bytes at ``offset`` and send them as one body message; the count."""
        async with self._slots:
            buf = self._free.pop() if self._free else bytearray(CHUNK_BYTES)
            try:
                view = memoryview(buf)[:length]
                count = await trio.to_thread.run_sync(os.preadv, fd, [view], offset)
                if count:
                    # hypercorn copies the body into bytes before send() returns: the buffer is free after.
                    await send({"type": "http.response.body", "body": view[:count], "more_body": more})
                view.release()
            finally:
                self._free.append(buf)
        return count


class FileBody(Response):
    """A slice of an open file, streamed in chunks; the file is closed at the end."""

    def __init__(self, fd: int, buffers: ReadBuffers, *, span: ByteRange | None, size: int, status_code: int,
                 headers: dict[str, str], send_body: bool) -> None:
        super().__init__(status_code=status_code, headers=headers)
        self.fd, self.buffers = fd, buffers
        self.offset = span.start if span else 0
        self.length = span.length if span else size
        self.send_body = send_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            offset, remaining = self.offset, self.length if self.send_body else 0
            while remaining > 0:
                step = min(CHUNK_BYTES, remaining)
                count = await self.buffers.read_and_send(self.fd, offset, step, send, more=remaining > step)
                if count < step:
                    break  # the file is shorter than it was: the client sees a short body and retries
                offset += count
                remaining -= count
            if remaining or not (self.send_body and self.length):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            os.close(self.fd)


def _headers(runtime: Runtime, entry: MediaEntry) -> dict[str, str]:
    scope = "private" if entry.private or runtime.config.media.access != "lan" else "public"
    return {"ETag": entry.etag, "Cache-Control": f"{scope}, max-age={runtime.config.media.max_age_s}",
            "Accept-Ranges": "bytes", "X-Content-Type-Options": "nosniff", "Content-Type": entry.content_type}


def _without_type(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k != "Content-Type"}


class PassThrough(Response):
    """A file not cached yet, streamed through while it is cached (``[media] pass_through``)."""

    def __init__(self, through: Callable[[MediaEntry, Send, list[tuple[bytes, bytes]]], Awaitable[None]],
                 entry: MediaEntry, headers: dict[str, str]) -> None:
        super().__init__(status_code=200)
        self.through, self.entry = through, entry
        self.head = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.through(self.entry, send, self.head)


def _open(path: str) -> tuple[int, int] | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    return fd, os.fstat(fd).st_size


def create_app(runtime: Runtime, parts: WebParts) -> Starlette:
    buffers = ReadBuffers()

    async def serve(request: Request) -> Response:
        key = request.path_params["key"]
        shelf = runtime.media
        if shelf is None or not runtime.config.media.enabled:
            return json_error(503, "the media cache is not running", headers={"Retry-After": str(NOT_CACHED_RETRY_S)})
        found = await runtime.db.read(lambda conn: rows.served_file(conn, key))
        if found is None:
            raise ApiError(404, f"no media file {key!r} in the store's catalog")
        data, sha = found
        try:
            entry = parse_entry(key, data)
        except MediaEntryError as exc:
            raise ApiError(404, f"the catalog's entry for {key!r} cannot be used: {exc}") from exc
        await may_read(request, runtime, entry)
        opened = await trio.to_thread.run_sync(_open, str(shelf.blob_path(sha))) if sha else None
        if opened is None and shelf.pass_through is not None and request.method == "GET":
            return PassThrough(shelf.pass_through, entry, _headers(runtime, entry))
        if opened is None:
            return json_error(503, f"{key} is not cached yet; try again shortly",
                              headers={"Retry-After": str(NOT_CACHED_RETRY_S)})
        fd, size = opened
        assert sha is not None
        etag = f'"{sha}"'
        headers = _headers(runtime, entry)
        headers["ETag"] = etag
        if etag_matches(request.headers.get("if-none-match"), etag):
            os.close(fd)
            return Response(status_code=304, headers=_without_type(headers))
        span = parse_range(request.headers.get("range"), size)
        if_range = request.headers.get("if-range")
        if if_range is not None and if_range.strip() != etag:
            span = None  # RFC 9110 §13.1.5: the client's copy is another version: send it all
        if span is not None and not isinstance(span, ByteRange):
            os.close(fd)
            return JsonResponse({"error": f"range not satisfiable: {key} has {size} bytes"}, status_code=416,
                                headers={**_without_type(headers), "Content-Range": span.content_range()})
        shelf.note_served(sha, time.time())
        if span is not None:
            headers["Content-Range"] = span.content_range(size)
        headers["Content-Length"] = str(span.length if span else size)
        return FileBody(fd, buffers, span=span, size=size, status_code=206 if span else 200, headers=headers,
                        send_body=request.method != "HEAD")

    return service_app("media", runtime, [Route("/media/{key:path}", serve, methods=["GET", "HEAD"]),
                                          *parts.routes_for(runtime)])

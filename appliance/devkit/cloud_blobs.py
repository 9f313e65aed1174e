"""The simulator's blob storage: ``GET /blob/{store}/{key}`` like Azure Blob's anonymous read.

``ETag``, ``Accept-Ranges``, a single ``Range`` (206, 416 past the end), ``If-Match``
(412 when the file changed: blob storage has no If-Range) and ``If-None-Match`` (304).
Bodies are generated and streamed in :data:`BLOB_CHUNK` pieces, so several hundred MB of
large media cost no memory. :attr:`CloudState.blob_bytes_sent` counts the body bytes
really sent per key (a resumed download's total can be checked against the file size).

Faults (``POST /_sim/faults`` with a ``path`` under ``/blob/``):

- ``cut`` with ``after_bytes``: the connection is cut after that many body bytes;
- ``corrupt``: the first byte of the body is flipped (the sha256 no longer matches);
- ``slow`` with ``bytes_per_s``: the body is paced to that rate;
- ``status`` (404, 503, ...) and ``latency`` work as on every other path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Final

import trio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from appliance.devkit.cloud_faults import Fault
from appliance.devkit.cloud_state import BlobSource, CloudState
from appliance.devkit.cloud_wire import CloudApiError

__all__ = ["BLOB_CHUNK", "BlobStream", "blob_endpoint", "stream_while_read"]

BLOB_CHUNK: Final = 64 * 1024


def _range(header: str, size: int) -> tuple[int, int]:
    """``(start, end_inclusive)`` of a single-range ``Range`` header; CloudApiError 416 otherwise."""
    spec = header.strip()
    if not spec.startswith("bytes=") or "," in spec:
        raise CloudApiError(416, "range_not_satisfiable", "only one range of the form bytes=a-b is served")
    first, sep, last = spec[len("bytes="):].partition("-")
    if not sep or not (first or last) or not (first.isdigit() or not first) or not (last.isdigit() or not last):
        raise CloudApiError(416, "range_not_satisfiable", "only one range of the form bytes=a-b is served")
    if first == "":
        start, end = max(0, size - int(last)), size - 1
    else:
        start, end = int(first), min(size - 1, int(last)) if last else size - 1
    if start >= size or start > end:
        raise CloudApiError(416, "range_not_satisfiable", f"the file has {size} bytes")
    return start, end


async def stream_while_read(receive: Receive, stream: Callable[[], Awaitable[None]]) -> None:
    """Run ``stream`` (a response's sends) until it ends or the reader goes away: the server
    would drop the sends to a reader that left silently, and they must not count as sent."""

    async def watch(scope: trio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, nursery.cancel_scope)
        await stream()
        nursery.cancel_scope.cancel()


class BlobStream(Response):
    """Bytes ``start..end`` of a blob, generated chunk by chunk, with the faults of the request."""

    def __init__(self, state: CloudState, key: str, source: BlobSource, *, start: int, end: int, status_code: int,
                 headers: dict[str, str], faults: dict[str, Fault]) -> None:
        super().__init__(status_code=status_code, headers={**headers, "Content-Length": str(end - start + 1)},
                         media_type=source.content_type)
        self.state, self.key, self.source = state, key, source
        self.start, self.end, self.faults = start, end, faults

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await stream_while_read(receive, partial(self._stream, send))

    async def _stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        cut, corrupt, slow = self.faults.get("cut"), self.faults.get("corrupt"), self.faults.get("slow")
        sent = 0
        for piece in self.source.chunks(self.start, self.end, BLOB_CHUNK):
            chunk = bytes([piece[0] ^ 0xFF]) + piece[1:] if corrupt is not None and sent == 0 and piece else piece
            if cut is not None and sent + len(chunk) >= cut.after_bytes:
                last = chunk[:cut.after_bytes - sent]
                if last:
                    await send({"type": "http.response.body", "body": last, "more_body": True})
                    self.state.blob_bytes_sent[self.key] = self.state.blob_bytes_sent.get(self.key, 0) + len(last)
                # Returning without the final body message makes the server cut the connection.
                return
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            sent += len(chunk)
            self.state.blob_bytes_sent[self.key] = self.state.blob_bytes_sent.get(self.key, 0) + len(chunk)
            if slow is not None and slow.bytes_per_s:
                await trio.sleep(len(chunk) / slow.bytes_per_s)
            else:
                await trio.lowlevel.checkpoint()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def blob_endpoint(state: CloudState, request: Request) -> Response:
    if request.path_params["store"] != state.store_id:
        raise CloudApiError(404, "not_found", "no such container")
    key = request.path_params["key"]
    source = state.blob_source(key)
    if source is None:
        raise CloudApiError(404, "not_found", f"no media file {key!r}")
    etag = f'"{source.sha256[:32]}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes"}
    if_match = request.headers.get("if-match")
    if if_match is not None and if_match not in ("*", etag):
        raise CloudApiError(412, "precondition_failed", "the file changed since that ETag")
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    state.blob_requests.append((key, request.headers.get("range", "")))
    method, path = request.method, request.url.path
    faults = {kind: rule for kind in ("cut", "corrupt", "slow")
              if (rule := state.faults.take(kind, method, path)) is not None}
    if source.size and "range" in request.headers:
        start, end = _range(request.headers["range"], source.size)
        headers["Content-Range"] = f"bytes {start}-{end}/{source.size}"
        return BlobStream(state, key, source, start=start, end=end, status_code=206, headers=headers, faults=faults)
    return BlobStream(state, key, source, start=0, end=source.size - 1, status_code=200, headers=headers,
                      faults=faults)

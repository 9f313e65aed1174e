"""Resumable downloads into a file: the media cache's files and the firmware's bundles.

A download writes to a partial file beside an ``.etag`` file holding the ETag its first
bytes came with. A cut download resumes with ``Range: bytes=<have>-`` and
``If-Match: <etag>`` (blob storage has no If-Range); 412 or 416 means the file changed (or
the partial is off): the partial is dropped and the caller starts again from 0. A 206 must
start where the partial ends; a 200 starts over. More bytes than the expected size stop
the download (the partial is dropped). The caller verifies the size and hash of the whole.

Cancellation: the download stops between chunks; what was written stays for the next try
(the file is closed under a shield). Everything that touches the disk runs in a worker
thread.

Exceptions: :class:`DownloadError` (``restart``: try again from 0 at once; ``oversize``:
the body was longer than announced).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import IO, Final, cast

import httpx
import trio

__all__ = ["X_MS_VERSION", "DownloadError", "drop_partial", "etag_path", "partial_state", "receive", "request_headers"]

# Blob storage's REST version; without it an anonymous read may get an old, Range-less API.
X_MS_VERSION: Final = "2021-08-06"


class DownloadError(Exception):
    """A download that cannot go on as it is. ``message`` names the file (by the caller's
    name for it); ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, *, status: int | None = None, restart: bool = False,
                 oversize: bool = False) -> None:
        self.message, self.status, self.restart, self.oversize = message, status, restart, oversize
        super().__init__(message)


def etag_path(path: Path) -> Path:
    return path.with_name(path.name + ".etag")


def partial_state(path: Path) -> tuple[int, str]:
    """Bytes already downloaded to ``path`` and the ETag they came with ("" if unknown)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0, ""
    try:
        etag = etag_path(path).read_text("ascii").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        etag = ""
    return size, etag


def drop_partial(path: Path) -> None:
    path.unlink(missing_ok=True)
    etag_path(path).unlink(missing_ok=True)


def request_headers(have: int, etag: str) -> dict[str, str]:
    """The GET's headers: resume after ``have`` bytes (with the ETag they came with)."""
    headers = {"x-ms-version": X_MS_VERSION, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        headers["If-Match"] = etag
    return headers


def _save_etag(path: Path, etag: str) -> None:
    tmp = path.with_name(path.name + ".etag.tmp")
    tmp.write_text(etag, "ascii")
    tmp.replace(etag_path(path))


def _open_at(path: Path, offset: int, etag: str | None) -> IO[bytes]:
    """The partial file, open for writing at ``offset``; a new download's ETag saved first."""
    if etag is not None:
        _save_etag(path, etag)
    f = path.open("r+b" if offset else "wb")
    f.seek(offset)
    f.truncate()
    return f


async def receive(response: httpx.Response, path: Path, *, name: str, have: int, size: int,
                  on_chunk: Callable[[int], Awaitable[None]] | None = None) -> int:
    """Write the answer's body after the ``have`` bytes already in ``path``; the new total.

    ``on_chunk(n)`` is awaited after each chunk is written (progress, a rate limit)."""
    status = response.status_code
    if status in (412, 416):  # changed since the partial's ETag, or the partial is off
        await trio.to_thread.run_sync(drop_partial, path)
        raise DownloadError(f"{name} changed during its download", status=status, restart=True)
    if status == 206:
        first = response.headers.get("content-range", "").removeprefix("bytes ").split("-", 1)[0]
        if first != str(have):
            await trio.to_thread.run_sync(drop_partial, path)
            raise DownloadError(f"{name}: the resumed range did not start at {have}", status=status, restart=True)
    elif status == 200:
        have = 0
    else:
        words = "not found" if status == 404 else f"HTTP {status}"
        raise DownloadError(f"{name}: blob storage answered {words}", status=status)
    etag = response.headers.get("etag", "").strip() if have == 0 else None
    f = await trio.to_thread.run_sync(_open_at, path, have, etag)
    try:
        # Closed at once when the round ends mid-body, not left to the garbage collector.
        # (httpx types it an AsyncIterator; it is an async generator, which has aclose.)
        async with contextlib.aclosing(cast(AsyncGenerator[bytes, None], response.aiter_raw())) as chunks:
            async for chunk in chunks:
                if have + len(chunk) > size:
                    await trio.to_thread.run_sync(drop_partial, path)
                    raise DownloadError(f"{name}: more bytes than its size ({size})", status=status, oversize=True)
                await trio.to_thread.run_sync(f.write, chunk)
                have += len(chunk)
                if on_chunk is not None:
                    await on_chunk(len(chunk))
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(f.close)
    return have

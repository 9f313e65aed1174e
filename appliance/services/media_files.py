"""The media cache on disk: verified files named by their sha256, and downloads in progress.

Layout under ``<storage.dir>/media``::

    blobs/<sha256>          verified files, served as they are (read-only once in place)
    partial/<sha256>        a download in progress (resumable)
    partial/<sha256>.etag   the ETag its bytes came with (for If-Match on resume)

A file gets its name in ``blobs/`` only by an atomic rename after its size and sha256 were
checked and its bytes fsynced, so a partial or wrong file is never under a served name,
whatever crash happens (a SIGKILL, a power cut). Names come from the sha256, never from a
catalog key, so no key can reach any other path. Everything here blocks: call it in a
worker thread.

:class:`MediaShelf` is the service's state reached through ``runtime.media``: the paths,
the status (:class:`~appliance.protocol.media_cache.MediaStatus`) and the serve times not
yet written to the database.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Final

import attrs
from starlette.types import Send

from appliance.protocol.media import MediaEntry
from appliance.protocol.media_cache import MediaStatus

__all__ = ["MediaShelf", "hash_file"]

_SHA256: Final = re.compile(r"[0-9a-f]{64}")
# Bytes hashed per read: large enough that Python's overhead is noise.
HASH_CHUNK: Final = 1024 * 1024
# Serve times kept in memory between flushes to the database (one entry per file).
SERVED_MAX: Final = 100_000


def hash_file(path: Path, *, limit: int | None = None) -> tuple[hashlib._Hash, int]:
    """A running sha256 over the first ``limit`` bytes (all by default), and their count."""
    digest = hashlib.sha256()
    count = 0
    with path.open("rb") as f:
        while limit is None or count < limit:
            chunk = f.read(HASH_CHUNK if limit is None else min(HASH_CHUNK, limit - count))
            if not chunk:
                break
            digest.update(chunk)
            count += len(chunk)
    return digest, count


@attrs.define(kw_only=True, eq=False)
class MediaShelf:
    root: Path
    status: MediaStatus = attrs.field(factory=MediaStatus)
    # sha256 -> when it was last served; the fetcher writes them out on each scan.
    served: dict[str, float] = attrs.field(factory=dict)
    # sha256 of the files being downloaded now (by the fetcher or a reader's pass-through):
    # one download per file, so two never write the same partial file.
    busy: set[str] = attrs.field(factory=set)
    # Set by the media service when [media] pass_through is on: streams a file not cached
    # yet to a reader while caching it (``appliance.services.media_through``).
    pass_through: Callable[[MediaEntry, Send, list[tuple[bytes, bytes]]], Awaitable[None]] | None = None

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def partial(self) -> Path:
        return self.root / "partial"

    def prepare(self) -> None:
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.partial.mkdir(parents=True, exist_ok=True)

    def blob_path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.blobs / sha256

    def partial_path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.partial / sha256

    def note_served(self, sha256: str, now: float) -> None:
        if len(self.served) < SERVED_MAX or sha256 in self.served:
            self.served[sha256] = now

    def take_served(self) -> dict[str, float]:
        served, self.served = self.served, {}
        return served

    # --- what is on disk ----------------------------------------------------------------

    def files(self) -> dict[str, int]:
        """sha256 -> size of every file under ``blobs/`` (whatever the database says)."""
        out: dict[str, int] = {}
        for entry in os.scandir(self.blobs):
            if _SHA256.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                out[entry.name] = entry.stat(follow_symlinks=False).st_size
        return out

    def verify(self, sha256: str) -> bool:
        """Hash a file of ``blobs/`` again; a file that does not match is deleted."""
        path = self.blob_path(sha256)
        try:
            digest, _ = hash_file(path)
        except FileNotFoundError:
            return False
        if digest.hexdigest() == sha256:
            return True
        path.unlink(missing_ok=True)
        return False

    def remove(self, sha256: str) -> None:
        """Delete a cached file (an open reader keeps its bytes until it closes)."""
        self.blob_path(sha256).unlink(missing_ok=True)

    def drop_partial(self, sha256: str) -> None:
        path = self.partial_path(sha256)
        path.unlink(missing_ok=True)
        path.with_suffix(".etag").unlink(missing_ok=True)

    def partial_names(self) -> frozenset[str]:
        """The sha256 of every download in progress."""
        return frozenset(entry.name.split(".", 1)[0] for entry in os.scandir(self.partial))

    def drop_partials(self, shas: Iterable[str]) -> None:
        """Delete these downloads in progress (no longer wanted)."""
        for sha in shas:
            self.drop_partial(sha)

    def partial_state(self, sha256: str) -> tuple[int, str, int]:
        """Bytes already downloaded, the ETag they came with ("" if unknown), and the free
        disk (one call: a download's start is one trip to a worker thread)."""
        path = self.partial_path(sha256)
        free = self.free_bytes()
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return 0, "", free
        try:
            etag = path.with_suffix(".etag").read_text("ascii").strip()
        except (FileNotFoundError, UnicodeDecodeError):
            etag = ""
        return size, etag, free

    def place(self, sha256: str) -> None:
        """Move a verified download into ``blobs/``: fsync the bytes, then rename.

        The bytes are on disk before the name is, so a power cut never leaves a served name
        on unwritten bytes. The directory is not fsynced: a rename lost to a power cut only
        means the file is fetched again (start-up drops a database row without its file).
        """
        path = self.partial_path(sha256)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(path, self.blob_path(sha256))
        path.with_suffix(".etag").unlink(missing_ok=True)

    def free_bytes(self) -> int:
        """Free disk space for this user where the cache lives."""
        return shutil.disk_usage(self.root).free

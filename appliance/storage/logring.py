"""The log ring: the appliance's log records on disk, bounded, for shipping, bundles and the tail.

Layout of ``<storage.dir>/logs``:

- ``seg-<first seq, 16 digits>.ndjson``: segments of at most ``segment_bytes``, one JSON
  record a line, ``{"seq":17,"ts":...,"level":"info","logger":"...","msg":"...","fields":{...}}``
  (``exc`` when there was a traceback). ``seq`` increases by one per record, for ever.
- ``ring.id``: made with the directory; a record's identity is ``(ring id, seq)``.
- ``shipped.json``: the shipping cursor (the last seq the intake took), written atomically.

Bounds: the ring holds at most ``ring_bytes`` (the oldest segments are deleted when a new
one starts); :data:`MAX_PENDING` records wait in memory for the writer; a message is cut
at :data:`MAX_MESSAGE_CHARS`.

Writes: :meth:`LogRing.append` (called by :class:`RingHandler` on whatever thread logs)
only formats the record and queues it; it never touches the disk, so logging never waits
on the SD card. One writer thread redacts, encodes and appends with one ``write()`` per
``flush_interval_s`` (or per :data:`FLUSH_BYTES` of records). No fsync per record: one when
a segment is closed and one at close. A crash loses at most the last flush interval (a
power cut, what the kernel had not written back). Opening truncates a torn last line.
Records that do not fit in the pending queue (the disk stalled) are dropped and counted,
and their seqs are skipped, so the shipper sees, and reports, the gap.

Reading (:func:`read_after`, :func:`last_lines`) works on the directory alone, so
``appliance bundle`` reads the ring of a stopped box.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any, Final

import attrs

from appliance.protocol.redact import MASK, Redactor
from appliance.storage.secrets import read_secret, write_secret

__all__ = ["MAX_PENDING", "Batch", "LogRing", "RingHandler", "RingReader", "RingStats", "last_lines",
           "load_cursor", "read_after", "ring_id", "save_cursor"]

# Records queued for the writer; at 1 record/ms this is 10 s of a stalled disk.
MAX_PENDING: Final = 10_000
# The writer writes at once when this much is waiting, whatever the interval.
FLUSH_BYTES: Final = 64 * 1024
# One record's message (and traceback): longer ones are cut, with a marker.
MAX_MESSAGE_CHARS: Final = 8192
# Extra fields of one record: at most this many, each value at most MAX_FIELD_CHARS.
MAX_FIELDS: Final = 32
MAX_FIELD_CHARS: Final = 1024
# Records kept in memory, redacted, for the live tail (its backlog and its feed).
RECENT: Final = 2000
SEGMENT_MAX_BYTES: Final = 1024 * 1024
SEGMENT_MIN_BYTES: Final = 8 * 1024
_PREFIX: Final = "seg-"
_SUFFIX: Final = ".ndjson"
_CURSOR: Final = "shipped.json"
_RING_ID: Final = "ring.id"
_STANDARD: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_SECRET_WORDS: Final = ("token", "password", "secret", "key", "authorization")

log = logging.getLogger(__name__)


@attrs.frozen(kw_only=True)
class RingStats:
    records: int  # written since this process opened the ring
    bytes: int  # written since open (what the SD card sees, before the file system's own)
    dropped: int  # dropped since open: the writer could not keep up
    write_errors: int
    last_error: str
    segments: int
    disk_bytes: int
    first_seq: int
    last_seq: int

    def as_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


def _segments(directory: Path) -> list[tuple[int, Path]]:
    out = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        if name.startswith(_PREFIX) and name.endswith(_SUFFIX):
            digits = name[len(_PREFIX):-len(_SUFFIX)]
            if digits.isdigit():
                out.append((int(digits), directory / name))
    return sorted(out)


def seq_of(line: bytes) -> int | None:
    """The seq of an encoded record (they start with ``{"seq":N,``), None if not one."""
    if not line.startswith(b'{"seq":'):
        return None
    end = line.find(b",", 7)
    digits = line[7:end]
    return int(digits) if end > 7 and digits.isdigit() else None


def _valid(line: bytes) -> bool:
    if seq_of(line) is None:
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def ring_id(directory: Path) -> str:
    """The ring's id, made on first use."""
    existing = read_secret(directory / _RING_ID)
    if existing:
        return existing
    value = secrets.token_hex(6)
    write_secret(directory / _RING_ID, value + "\n")
    return value


def load_cursor(directory: Path) -> tuple[int, int]:
    """``(last shipped seq, records reported dropped so far)``; ``(0, 0)`` if never shipped."""
    try:
        data = json.loads((directory / _CURSOR).read_text("utf-8"))
        return int(data["seq"]), int(data.get("dropped_total", 0))
    except (OSError, ValueError, KeyError, TypeError):
        return 0, 0


def save_cursor(directory: Path, seq: int, dropped_total: int) -> None:
    """Durable before it returns (fsync, atomic rename): one small write per shipped batch."""
    write_secret(directory / _CURSOR, json.dumps({"seq": seq, "dropped_total": dropped_total}) + "\n")


@attrs.frozen(kw_only=True)
class Batch:
    """Encoded records after some seq, in order; ``lines`` have no newline."""

    lines: tuple[bytes, ...]
    first: int
    last: int
    size: int


class RingReader:
    """Reads forward from a seq, remembering where it stopped, so reading the next batch
    does not scan the segment again from its start. Not thread-safe: one per reader."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._path: Path | None = None
        self._offset = 0
        self._next = -1  # the seq expected at (_path, _offset)

    def read_after(self, after: int, *, max_records: int, max_bytes: int) -> Batch:
        lines: list[bytes] = []
        size = 0
        first = last = 0
        with contextlib.closing(self._lines_from(after + 1)) as found:  # closes its file at once
            for line, seq, path, offset in found:
                if seq <= after:
                    continue
                if lines and (len(lines) >= max_records or size + len(line) > max_bytes):
                    break
                lines.append(line)
                size += len(line) + 1
                first = first or seq
                last = seq
                # Remember where the next read starts: just after the last line taken.
                self._path, self._offset, self._next = path, offset, seq + 1
        return Batch(lines=tuple(lines), first=first, last=last, size=size)

    def _lines_from(self, wanted: int) -> Generator[tuple[bytes, int, Path, int]]:
        """``(line, seq, segment, offset just after the line)`` from the segment holding
        ``wanted`` (or the oldest), resuming at the remembered offset when it fits."""
        segments = _segments(self.directory)
        start = 0
        for i, (first, _) in enumerate(segments):
            if first <= wanted:
                start = i
        resume = self._next == wanted and any(p == self._path for _, p in segments)
        for first, path in segments[start:]:
            if resume and path != self._path and first < wanted:
                continue  # an earlier segment than the one we stopped in
            offset = self._offset if resume and path == self._path else 0
            resume = False
            try:
                with path.open("rb") as f:
                    f.seek(offset)
                    while True:
                        raw = f.readline()
                        if not raw.endswith(b"\n"):
                            break  # the end, or a line still being written
                        offset += len(raw)
                        seq = seq_of(raw[:-1])
                        if seq is not None:
                            yield raw[:-1], seq, path, offset
            except FileNotFoundError:
                continue  # deleted by the writer while we read: the next one follows


def read_after(directory: Path, after: int, *, max_records: int, max_bytes: int) -> Batch:
    """Records with seq > ``after``, in order, at most ``max_records`` and about ``max_bytes``."""
    return RingReader(directory).read_after(after, max_records=max_records, max_bytes=max_bytes)


def last_lines(directory: Path, count: int) -> list[bytes]:
    """The last ``count`` complete records of the ring, oldest first."""
    out: collections.deque[bytes] = collections.deque(maxlen=count)
    for _, path in reversed(_segments(directory)):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        chunk = [line for line in data.split(b"\n")[:-1] if seq_of(line) is not None]
        out.extendleft(reversed(chunk[-(count - len(out)):] if count > len(out) else []))
        if len(out) >= count:
            break
    return list(out)


def _recover(directory: Path) -> int:
    """Truncate a torn tail of the last segment; the last complete seq (0 if none)."""
    for _first, path in reversed(_segments(directory)):
        data = path.read_bytes()
        keep = len(data)
        last = 0
        while keep > 0:
            end = data.rfind(b"\n", 0, keep)
            start = data.rfind(b"\n", 0, end) + 1 if end >= 0 else 0
            line = data[start:end] if end >= 0 else b""
            if end >= 0 and _valid(line):
                last = seq_of(line) or 0
                keep = end + 1
                break
            keep = start if end >= 0 else 0
        if keep != len(data):
            with path.open("r+b") as f:
                f.truncate(keep)
        if last:
            return last
        if keep == 0:
            path.unlink()  # nothing valid in it: a segment created just before a crash
    return 0


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more characters cut]"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.__dict__.items():
        if key in _STANDARD or key.startswith("_"):
            continue
        if len(out) >= MAX_FIELDS:
            break
        if any(word in key.lower() for word in _SECRET_WORDS):
            out[key] = MASK
        elif isinstance(value, bool | int | float) or value is None:
            out[key] = value
        else:
            out[key] = _short(str(value), MAX_FIELD_CHARS)
    return out


_EXC_FORMATTER: Final = logging.Formatter()


class LogRing:
    """The ring of one state directory. :meth:`open` starts its writer thread; :meth:`close`
    writes what is pending, fsyncs and stops it. Closing twice is harmless."""

    def __init__(self, directory: Path, *, ring_bytes: int, flush_interval_s: float, next_seq: int,
                 ring: str) -> None:
        self.directory = directory
        self.ring_bytes = ring_bytes
        self.segment_bytes = max(SEGMENT_MIN_BYTES, min(SEGMENT_MAX_BYTES, ring_bytes // 8))
        self.flush_interval_s = flush_interval_s
        self.ring_id = ring
        self.redactor = Redactor()
        self._cond = threading.Condition()
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._next = next_seq
        self._closing = False
        self._queued = self._flushed = next_seq - 1  # the last seq queued; the last written
        # The last records, redacted, for the live tail; the writer appends under the lock
        # (copying a deque while another thread appends raises).
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT)
        self._recent_lock = threading.Lock()
        self._records = self._bytes = self._dropped = self._errors = 0
        self._last_error = ""
        self._fd: int | None = None
        self._fd_size = 0
        self._thread = threading.Thread(target=self._run, name="log-ring-writer", daemon=True)

    @classmethod
    def open(cls, directory: Path, *, ring_bytes: int, flush_interval_s: float) -> LogRing:
        """Open (creating) the ring in ``directory`` and start its writer. Blocking."""
        directory.mkdir(parents=True, exist_ok=True)
        last = _recover(directory)
        shipped, _ = load_cursor(directory)
        ring = cls(directory, ring_bytes=ring_bytes, flush_interval_s=flush_interval_s,
                   next_seq=max(last, shipped) + 1, ring=ring_id(directory))
        for line in last_lines(directory, RECENT):
            try:
                ring._recent.append(json.loads(line))
            except ValueError:
                continue
        ring._thread.start()
        return ring

    # -- the logging side: any thread, never blocks on the disk -----------------------------

    def append(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        item: dict[str, Any] = {"seq": 0, "ts": round(record.created, 3), "level": record.levelname.lower(),
                                "logger": record.name, "msg": _short(message, MAX_MESSAGE_CHARS)}
        fields = _fields(record)
        if fields:
            item["fields"] = fields
        if record.exc_info:
            item["exc"] = _short(_EXC_FORMATTER.formatException(record.exc_info), MAX_MESSAGE_CHARS)
        with self._cond:
            item["seq"] = self._next
            self._next += 1
            if len(self._pending) >= MAX_PENDING or self._closing:
                self._dropped += 1
                return
            self._pending.append(item)
            self._queued = item["seq"]
            if len(self._pending) == 1:
                self._cond.notify()

    def set_redactor(self, redactor: Redactor) -> None:
        self.redactor = redactor  # one reference swap: the writer picks it up on its next record

    # -- the writer thread --------------------------------------------------------------------

    def _run(self) -> None:
        buffer: list[tuple[int, bytes]] = []
        buffered = last_seq = 0
        since = 0.0  # when the oldest buffered record arrived: it waits at most one interval
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    timeout = None if not buffer else since + self.flush_interval_s - time.monotonic()
                    if timeout is not None and timeout <= 0:
                        break
                    self._cond.wait(timeout)
                items = list(self._pending)
                self._pending.clear()
                closing = self._closing
            redactor = self.redactor
            done: list[dict[str, Any]] = []
            for item in items:
                item["msg"] = redactor.redact(item["msg"])
                if "exc" in item:
                    item["exc"] = redactor.redact(item["exc"])
                if "fields" in item:
                    item["fields"] = {k: redactor.redact(v) if isinstance(v, str) else v
                                      for k, v in item["fields"].items()}
                line = json.dumps(item, ensure_ascii=False, separators=(",", ":"), default=str).encode() + b"\n"
                if not buffer:
                    since = time.monotonic()
                buffer.append((item["seq"], line))
                buffered += len(line)
                last_seq = item["seq"]
                done.append(item)
            with self._recent_lock:
                self._recent.extend(done)
            if buffer and (closing or buffered >= FLUSH_BYTES or time.monotonic() - since >= self.flush_interval_s):
                self._write(buffer)
                buffer, buffered = [], 0
                with self._cond:
                    self._flushed = last_seq
                    self._cond.notify_all()
            if closing:
                with self._cond:
                    if self._pending:
                        continue
                self._close_fd(sync=True)
                return

    def _write(self, lines: list[tuple[int, bytes]]) -> None:
        """Append ``lines``, one ``write()`` per segment they fall in."""
        start = 0
        while start < len(lines):
            try:
                if self._fd is None or self._fd_size >= self.segment_bytes:
                    self._rotate(lines[start][0])
                room = self.segment_bytes - self._fd_size
                end, size = start, 0
                while end < len(lines) and (end == start or size + len(lines[end][1]) <= room):
                    size += len(lines[end][1])
                    end += 1
                assert self._fd is not None
                written = os.write(self._fd, b"".join(line for _, line in lines[start:end]))
                self._fd_size += written
                self._bytes += written
                self._records += end - start
            except OSError as exc:
                # Disk full or failing: these records are lost; the count and the error show
                # in the bundle and the shipper's health. Logging here would feed the loop.
                self._errors += 1
                self._dropped += len(lines) - start
                self._last_error = f"{type(exc).__name__}: {exc}"
                self._close_fd(sync=False)
                return
            start = end

    def _rotate(self, first_seq: int) -> None:
        self._close_fd(sync=True)
        path = self.directory / f"{_PREFIX}{first_seq:016d}{_SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self._fd_size = os.fstat(self._fd).st_size
        segments = _segments(self.directory)
        total = sum(_size(p) for _, p in segments)
        for _, old in segments[:-1]:
            if total <= self.ring_bytes:
                break
            total -= _size(old)
            old.unlink(missing_ok=True)

    def _close_fd(self, *, sync: bool) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if sync:
                os.fsync(fd)
        except OSError as exc:
            self._errors += 1
            self._last_error = f"{type(exc).__name__}: {exc}"
        finally:
            os.close(fd)

    # -- for the rest of the box ------------------------------------------------------------

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every record appended so far is written (or dropped). Blocking."""
        with self._cond:
            target = self._queued
            self._cond.notify()
            deadline = time.monotonic() + timeout_s
            while self._flushed < target and not (self._closing and not self._thread.is_alive()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
        return True

    @property
    def last_seq(self) -> int:
        with self._cond:
            return self._next - 1

    def recent_after(self, seq: int, limit: int = RECENT) -> list[dict[str, Any]]:
        """Records in memory with a seq above ``seq`` (redacted), oldest first."""
        with self._recent_lock:
            items = list(self._recent)
        out = [item for item in items if item["seq"] > seq]
        return out[-limit:]

    def stats(self) -> RingStats:
        segments = _segments(self.directory)
        return RingStats(records=self._records, bytes=self._bytes, dropped=self._dropped,
                         write_errors=self._errors, last_error=self._last_error, segments=len(segments),
                         disk_bytes=sum(_size(p) for _, p in segments),
                         first_seq=segments[0][0] if segments else 0, last_seq=self.last_seq)

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is pending, fsync, stop the writer. Blocking (bounded by ``timeout_s``)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class RingHandler(logging.Handler):
    """A logging handler that hands every record to a :class:`LogRing`."""

    def __init__(self, ring: LogRing) -> None:
        super().__init__()
        self.ring = ring

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.ring.append(record)
        except Exception:  # noqa: BLE001  # logging's own rule: a handler never raises into the caller
            self.handleError(record)

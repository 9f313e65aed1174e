"""What a process writes to disk: /proc/<pid>/io and the SQLite WAL's frames (helpers for
the benchmarks and the crash tests; not a benchmark itself).

The WAL format (https://www.sqlite.org/fileformat2.html#walformat): a 32-byte header
(magic, version, page size, checkpoint sequence, two salts, checksum) and then frames of
a 24-byte header and one page each. A frame's second word is the database's size in
pages for the last frame of a commit, 0 otherwise; frames whose salts differ from the
header's are left over from before the WAL was last restarted and are not part of it.
"""

from __future__ import annotations

import struct
from pathlib import Path

import attrs

__all__ = ["WalFrames", "wal_frames", "write_bytes"]

_HEADER = struct.Struct(">IIIIII")  # magic, version, page size, checkpoint seq, salt-1, salt-2
_FRAME = struct.Struct(">IIII")  # page number, db size after commit (0: not a commit), salt-1, salt-2
_WAL_HEADER_BYTES = 32
_FRAME_HEADER_BYTES = 24


@attrs.frozen(kw_only=True)
class WalFrames:
    frames: int  # valid frames (pages written to the WAL since it was last restarted)
    commits: int  # of them, the last frames of a commit
    page_size: int
    salt: tuple[int, int]


def wal_frames(wal: Path) -> WalFrames:
    """The WAL's valid frames and commits, read from the file (no SQLite connection, so
    nothing is checkpointed or recovered by looking). A missing or empty WAL has none."""
    try:
        data = wal.read_bytes()
    except FileNotFoundError:
        data = b""
    if len(data) < _WAL_HEADER_BYTES:
        return WalFrames(frames=0, commits=0, page_size=0, salt=(0, 0))
    _magic, _version, page_size, _seq, salt1, salt2 = _HEADER.unpack_from(data)
    frames = commits = 0
    offset = _WAL_HEADER_BYTES
    while offset + _FRAME_HEADER_BYTES + page_size <= len(data):
        _page, size_after, s1, s2 = _FRAME.unpack_from(data, offset)
        if (s1, s2) != (salt1, salt2):
            break
        frames += 1
        commits += size_after != 0
        offset += _FRAME_HEADER_BYTES + page_size
    return WalFrames(frames=frames, commits=commits, page_size=page_size, salt=(salt1, salt2))


def write_bytes(pid: int) -> int:
    """Bytes the process has caused to be sent to the storage layer (``write_bytes`` of
    /proc/<pid>/io: what reaches the disk, page cache write-back included, fsync'd or not)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise ValueError(f"no write_bytes in /proc/{pid}/io")

"""Secret files in the state directory: written atomically, mode 0600 from the start."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["fsync_dir", "load_or_create_token", "read_secret", "write_atomic", "write_secret"]


def write_secret(path: Path, data: str) -> None:
    """Replace ``path`` with ``data``: never readable by others, never half-written.

    Each call writes its own temporary file (a unique name, made 0600 from the start) and
    renames it over ``path``: concurrent saves never share a temporary name, so each one
    succeeds and the last rename wins with a complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, mode=0o600)


def write_atomic(path: Path, data: str, *, mode: int | None, owner: tuple[int, int] | None = None) -> None:
    """Replace ``path`` with ``data``, never half-written, with ``mode`` and ``owner`` from
    the start (``mode`` None leaves them to the filesystem: a FAT partition has none)."""
    # A name of its own: two writers (the running box and `appliance pair` beside it) never
    # rename each other's half-written file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if mode is None else mode)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        os.write(fd, data.encode("utf-8"))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, an unlink) durable: until then a power cut can
    bring a removed file back."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_secret(path: Path) -> str | None:
    try:
        return path.read_text("utf-8").strip() or None
    except FileNotFoundError:
        return None


def load_or_create_token(path: Path) -> str:
    """The token kept in ``path``, made (32 random bytes, URL-safe) on first use."""
    existing = read_secret(path)
    if existing:
        return existing
    token = secrets.token_urlsafe(32)
    write_secret(path, token)
    return token

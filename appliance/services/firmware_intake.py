"""Bundles a person brings, without a shell: the homepage's upload (and its JSON twin), and
a USB stick or the boot partition (docs/updates.md, "Without a shell").

A bundle is received to disk in pieces as it comes (never whole in memory: bundles are a
few hundred MiB), under ``[update] upload_max_bytes``, into ``update/local/`` on the data
partition; then RAUC checks its signature against the box's keyring (``rauc info``:
nothing is written to a slot). A bundle that fails is deleted and its refusal is the
last outcome (the homepage and the heartbeat say it), with plain words. One that passes
waits as ``runtime.firmware.local``: the update service installs it (now or in the
maintenance window, as the person chose), before any offer of the platform, and the same
trial decides whether it is kept.

- :func:`receiving`: a context in which the bytes are written (:class:`Sink`); whatever
  stops it (too large, cut short, the client gone, cancelled) leaves nothing on disk.
- :func:`accept`: the received bundle checked and handed to the update service, or
  :class:`IntakeRefused`.

Exceptions: :class:`IntakeRefused` (``status``: the HTTP status that says it, ``message``:
plain words for the person who brought the bundle).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import trio

from appliance import __version__
from appliance.protocol.firmware import SOURCES, LocalBundle, Outcome, OutcomeKind, Phase, When
from appliance.services.firmware import DISK_MARGIN_BYTES, INFO_DEADLINE_S, UpdateFiles, files_of, installer
from appliance.services.installer import InstallerError
from appliance.services.runtime import Runtime

__all__ = ["IntakeRefused", "Sink", "accept", "can_take", "receiving"]

log = logging.getLogger(__name__)

# Received bytes are written in pieces of about this size (one thread hop each).
WRITE_BYTES: Final = 1024 * 1024
_NAME_MAX: Final = 128


class IntakeRefused(Exception):
    """The bundle is not taken; nothing of it is left on disk."""

    def __init__(self, status: int, message: str) -> None:
        self.status, self.message = status, message
        super().__init__(message)


def can_take(runtime: Runtime) -> None:
    """Refuse (409) while the box cannot take a bundle: no A/B slots, updates off, an update
    under way, another bundle being received."""
    st = runtime.firmware
    if not runtime.config.update.enabled:
        raise IntakeRefused(409, "Firmware updates are turned off on this box ([update] enabled = false).")
    if not st.version:
        raise IntakeRefused(503, "The update service is not running yet; try again in a minute.")
    if not st.slot:
        raise IntakeRefused(409, "This box has no A/B system slots: it is updated by flashing a new image.")
    if st.trial is not None or st.phase in (Phase.INSTALLING, Phase.REBOOTING, Phase.TRIAL):
        raise IntakeRefused(409, f"An update is under way ({st.phase}); bring the bundle again once it ended.")
    if st.receiving:
        raise IntakeRefused(409, f"Another bundle is being received ({st.receiving}); one at a time.")


def clean_name(name: str) -> str:
    """A file name as people see it: its last path part, printable, bounded."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(c for c in base if c.isprintable())[:_NAME_MAX] or "bundle"


class Sink:
    """Where a bundle's bytes go: a file in ``update/local/``, hashed as it is written."""

    def __init__(self, path: Path, cap: int) -> None:
        self.path, self.cap = path, cap
        self.size = 0
        self.digest = hashlib.sha256()
        self._pending = bytearray()
        self._file = path.open("xb")

    async def write(self, data: bytes) -> None:
        """More of the bundle; :class:`IntakeRefused` (413) once it is over the cap."""
        self.size += len(data)
        if self.size > self.cap:
            raise IntakeRefused(413, f"The file is larger than the largest bundle this box takes "
                                     f"({self.cap // 2**20} MiB, [update] upload_max_bytes); nothing was kept.")
        self._pending += data
        if len(self._pending) >= WRITE_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        chunk, self._pending = bytes(self._pending), bytearray()
        await trio.to_thread.run_sync(self._write, chunk)

    def _write(self, chunk: bytes) -> None:
        self.digest.update(chunk)
        self._file.write(chunk)

    async def finish(self) -> str:
        """Everything written and flushed to the disk; the sha256 of the bytes."""
        await self._flush()
        await trio.to_thread.run_sync(self._sync)
        return self.digest.hexdigest()

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


@asynccontextmanager
async def receiving(runtime: Runtime, *, name: str, declared: int | None) -> AsyncIterator[Sink]:
    """A sink for one bundle. Unless :func:`accept` took it, the partial file is deleted
    whatever ends the context (an error, the client gone, cancellation: the deletion is
    shielded and quick)."""
    can_take(runtime)
    cfg, st = runtime.config.update, runtime.firmware
    cap = cfg.upload_max_bytes
    if declared is not None and declared > cap:
        raise IntakeRefused(413, f"The file is larger than the largest bundle this box takes ({cap // 2**20} MiB, "
                                 "[update] upload_max_bytes); nothing was kept.")
    files = files_of(runtime.config)
    free = (await trio.to_thread.run_sync(shutil.disk_usage, files.local_dir)).free
    if free - (declared or cap) < DISK_MARGIN_BYTES:
        raise IntakeRefused(507, f"The data partition has not enough room for the bundle (it must leave "
                                 f"{DISK_MARGIN_BYTES // 2**20} MiB free); nothing was kept.")
    path = files.local_dir / f".incoming-{secrets.token_hex(8)}.part"
    sink = await trio.to_thread.run_sync(Sink, path, cap)
    st.receiving = f"receiving {clean_name(name)}"
    try:
        yield sink
    finally:
        with trio.CancelScope(shield=True):
            if sink.path.name.startswith(".incoming-"):
                await trio.to_thread.run_sync(sink.discard)
        st.receiving = ""  # once nothing is left of it


def plain_refusal(exc: InstallerError) -> str:
    """RAUC's refusal in words for the person who brought the bundle (its own words after)."""
    words = str(exc)
    if "signature" in words.lower():
        what = ("its signature does not check against this box's keyring: it was not made for this box, "
                "or it was damaged")
    else:
        what = "it is not a firmware bundle this box can read"
    return f"{what} (RAUC: {words})"


async def accept(runtime: Runtime, sink: Sink, *, name: str, source: str, when: When) -> LocalBundle:
    """Check the received bundle and hand it to the update service. :class:`IntakeRefused`
    (400) with plain words when RAUC refuses it (the refusal is recorded as the last
    outcome, the file deleted); 409 when it is the version running."""
    if source not in SOURCES or source == "platform":
        raise ValueError(f"not a source a person brings a bundle from: {source!r}")
    st = runtime.firmware
    name = clean_name(name)
    sha256 = await sink.finish()
    if sink.size == 0:
        raise IntakeRefused(400, "The file is empty; nothing was kept.")
    can_take_again(runtime)
    st.receiving = f"checking the signature of {name}"
    try:
        with trio.fail_after(INFO_DEADLINE_S):
            info = await installer(runtime.config).info(sink.path)
    except (InstallerError, trio.TooSlowError) as exc:
        reason = (plain_refusal(exc) if isinstance(exc, InstallerError)
                  else f"its signature could not be checked within {INFO_DEADLINE_S:g} s")
        await _record_refusal(runtime, name=name, source=source, reason=reason)
        raise IntakeRefused(400, f"{name} was refused before anything was written: {reason}.") from exc
    if info.version == __version__:
        raise IntakeRefused(409, f"{name} is firmware {info.version}, the version this box runs; nothing to do.")
    local = LocalBundle(version=info.version, sha256=sha256, size=sink.size, source=source, name=name, when=when,
                        at=time.time())
    files = files_of(runtime.config)
    await trio.to_thread.run_sync(_keep, files, sink, local)
    sink.path = files.local_bundle(sha256)  # taken: the context leaves it
    st.local, st.error = local, ""
    runtime.firmware_changes.notify()
    log.warning("update: %s (%s) brought by %s, signature checked; installing %s", local.version, name, source,
                "now" if when is When.NOW else "in the maintenance window")
    return local


def can_take_again(runtime: Runtime) -> None:
    """While the bytes came, an update may have started (an offer in its window)."""
    st = runtime.firmware
    if st.trial is not None or st.phase in (Phase.INSTALLING, Phase.REBOOTING, Phase.TRIAL):
        raise IntakeRefused(409, f"An update started meanwhile ({st.phase}); bring the bundle again once it ended.")


def _keep(files: UpdateFiles, sink: Sink, local: LocalBundle) -> None:
    """The bundle under its hash's name and its record (written whole, fsynced); any bundle
    brought before is dropped: the newest one wins."""
    os.replace(sink.path, files.local_bundle(local.sha256))
    files.write_local(local)
    files.clear_local(keep=local.sha256)


async def _record_refusal(runtime: Runtime, *, name: str, source: str, reason: str) -> None:
    st = runtime.firmware
    outcome = Outcome(version="", kind=OutcomeKind.REFUSED, at=time.time(), reason=f"{name}: {reason}",
                      slot=st.slot, source=source)
    await trio.to_thread.run_sync(files_of(runtime.config).write_last, outcome)
    st.last = outcome
    runtime.firmware_changes.notify()
    log.error("update: %s from %s refused: %s", name, source, reason)

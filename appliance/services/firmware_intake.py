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
- :func:`run_inbox`: the inbox the system fills as root (``update/inbox/usb/`` from a USB
  stick, ``update/inbox/boot/`` from the boot partition: the image's ``take-bundle``),
  looked at every ``[update] inbox_interval_s``. Each bundle there is checked the same way
  and installed as ``[update] inbox_when`` says (now, by default: a person plugged the
  stick in), then deleted from the inbox whatever came of it: it is tried once. A
  ``<name>.refused`` file there is the system's word that it could not take a bundle
  (not enough room): it becomes the last outcome.

Exceptions: :class:`IntakeRefused` (``status``: the HTTP status that says it, ``message``:
plain words for the person who brought the bundle).
"""

from __future__ import annotations

import functools
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
from appliance.protocol.text import Number, Text
from appliance.services.firmware import DISK_MARGIN_BYTES, INFO_DEADLINE_S, UpdateFiles, files_of, installer
from appliance.services.installer import InstallerError
from appliance.services.media_files import hash_file
from appliance.services.runtime import Runtime

__all__ = ["INBOX_DIR", "INBOX_SOURCES", "IntakeRefused", "Sink", "accept", "accept_file", "can_take", "receiving",
           "run_inbox", "take_inbox"]

log = logging.getLogger(__name__)

# Received bytes are written in pieces of about this size (one thread hop each).
WRITE_BYTES: Final = 1024 * 1024
_NAME_MAX: Final = 128
# update/inbox/<source>/: where the system (root) puts a bundle it found for the appliance.
INBOX_DIR: Final = "inbox"
INBOX_SOURCES: Final = ("usb", "boot")
REFUSED_SUFFIX: Final = ".refused"
# What the system's refusal note may say (a line or two).
NOTE_MAX_BYTES: Final = 2048


class IntakeRefused(Exception):
    """The bundle is not taken; nothing of it is left on disk. ``why``: "signature" (RAUC
    refused it; the refusal is recorded), "runs" (the version running), "busy" (an update
    under way: try again later), "" (anything else)."""

    def __init__(self, status: int, message: str, why: str = "") -> None:
        self.status, self.message, self.why = status, message, why
        super().__init__(message)


def _too_large(cap: int) -> Text:
    return Text("The file is larger than the largest bundle this box takes ({mib} MiB, [update] upload_max_bytes); "
                "nothing was kept.", mib=Number(cap // 2**20))


def can_take(runtime: Runtime) -> None:
    """Refuse (409) while the box cannot take a bundle: no A/B slots, updates off, an update
    under way, another bundle being received."""
    st = runtime.firmware
    if not runtime.config.update.enabled:
        raise IntakeRefused(409, Text("Firmware updates are turned off on this box ([update] enabled = false)."))
    if not st.version:
        raise IntakeRefused(503, Text("The update service is not running yet; try again in a minute."))
    if not st.slot:
        raise IntakeRefused(409, Text("This box has no A/B system slots: it is updated by flashing a new image."))
    if st.trial is not None or st.phase in (Phase.INSTALLING, Phase.REBOOTING, Phase.TRIAL):
        raise IntakeRefused(409, Text("An update is under way ({phase}); bring the bundle again once it ended.",
                                      phase=str(st.phase)), "busy")
    if st.receiving:
        raise IntakeRefused(409, Text("Another bundle is being received ({what}); one at a time.", what=st.receiving),
                            "busy")


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
            raise IntakeRefused(413, _too_large(self.cap))
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
        raise IntakeRefused(413, _too_large(cap))
    files = files_of(runtime.config)
    free = (await trio.to_thread.run_sync(shutil.disk_usage, files.local_dir)).free
    if free - (declared or cap) < DISK_MARGIN_BYTES:
        raise IntakeRefused(507, Text("The data partition has not enough room for the bundle (it must leave "
                                      "{mib} MiB free); nothing was kept.", mib=Number(DISK_MARGIN_BYTES // 2**20)))
    path = files.local_dir / f".incoming-{secrets.token_hex(8)}.part"
    sink = await trio.to_thread.run_sync(Sink, path, cap)
    st.receiving = clean_name(name)
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
        what = Text("its signature does not check against this box's keyring: it was not made for this box, "
                    "or it was damaged")
    else:
        what = Text("it is not a firmware bundle this box can read")
    return Text("{what} (RAUC: {words})", what=what, words=words)


async def accept(runtime: Runtime, sink: Sink, *, name: str, source: str, when: When) -> LocalBundle:
    """Check the received bundle and hand it to the update service (:func:`accept_file`)."""
    sha256 = await sink.finish()
    if sink.size == 0:
        raise IntakeRefused(400, Text("The file is empty; nothing was kept."))
    local = await accept_file(runtime, sink.path, size=sink.size, sha256=sha256, name=name, source=source, when=when)
    sink.path = files_of(runtime.config).local_bundle(sha256)  # taken: the context leaves it
    return local


async def accept_file(runtime: Runtime, path: Path, *, size: int, sha256: str, name: str, source: str,
                      when: When) -> LocalBundle:
    """Check a bundle on the data partition and hand it to the update service: moved to
    ``update/local/<sha256>.raucb``. :class:`IntakeRefused` (400) with plain words when RAUC
    refuses it (the refusal is recorded as the last outcome; the caller deletes the file);
    409 when it is the version running, or an update started meanwhile."""
    if source not in SOURCES or source == "platform":
        raise ValueError(f"not a source a person brings a bundle from: {source!r}")
    st = runtime.firmware
    name = clean_name(name)
    can_take_again(runtime)
    st.receiving = name
    try:
        with trio.fail_after(INFO_DEADLINE_S):
            info = await installer(runtime.config).info(path)
    except (InstallerError, trio.TooSlowError) as exc:
        reason = (plain_refusal(exc) if isinstance(exc, InstallerError)
                  else Text("its signature could not be checked within {seconds} s", seconds=Number(INFO_DEADLINE_S)))
        await _record_refusal(runtime, name=name, source=source, reason=reason)
        raise IntakeRefused(400, Text("{name} was refused before anything was written: {reason}.", name=name,
                                      reason=reason), "signature") from exc
    if info.version == __version__:
        raise IntakeRefused(409, Text("{name} is firmware {version}, the version this box runs; nothing to do.",
                                      name=name, version=info.version), "runs")
    local = LocalBundle(version=info.version, sha256=sha256, size=size, source=source, name=name, when=when,
                        at=time.time())
    await trio.to_thread.run_sync(_keep, files_of(runtime.config), path, local)
    st.local, st.error = local, ""
    runtime.firmware_changes.notify()
    log.warning("update: %s (%s) brought by %s, signature checked; installing %s", local.version, name, source,
                "now" if when is When.NOW else "in the maintenance window")
    return local


def can_take_again(runtime: Runtime) -> None:
    """While the bytes came, an update may have started (an offer in its window)."""
    st = runtime.firmware
    if st.trial is not None or st.phase in (Phase.INSTALLING, Phase.REBOOTING, Phase.TRIAL):
        raise IntakeRefused(409, Text("An update started meanwhile ({phase}); bring the bundle again once it ended.",
                                      phase=str(st.phase)), "busy")


def _keep(files: UpdateFiles, path: Path, local: LocalBundle) -> None:
    """The bundle under its hash's name and its record (written whole, fsynced); any bundle
    brought before is dropped: the newest one wins."""
    os.replace(path, files.local_bundle(local.sha256))
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


# --- the inbox: a USB stick, the boot partition ----------------------------------------------


def _inbox_entries(root: Path) -> list[tuple[str, Path]]:
    """(source, path) of the bundles and refusal notes in the inbox, oldest first; the
    inbox's directories made if missing (the system writes into them as root)."""
    found: list[tuple[float, str, Path]] = []
    for source in INBOX_SOURCES:
        where = root / INBOX_DIR / source
        where.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in where.iterdir():
            if not path.name.startswith(".") and path.name.endswith((".raucb", REFUSED_SUFFIX)) and path.is_file():
                found.append((path.stat().st_mtime, source, path))
    return [(source, path) for _, source, path in sorted(found)]


def _read_note(path: Path) -> str:
    with path.open("rb") as f:
        text = f.read(NOTE_MAX_BYTES).decode("utf-8", "replace")
    return " ".join(text.split()) or "the system could not take it"


def _busy(runtime: Runtime) -> bool:
    """A passing reason not to take a bundle now (it waits in the inbox)."""
    st = runtime.firmware
    return (not st.version or bool(st.receiving) or st.trial is not None
            or st.phase in (Phase.INSTALLING, Phase.REBOOTING, Phase.TRIAL))


async def take_inbox(runtime: Runtime) -> int:
    """One look at the inbox; each bundle there is tried once. Returns how many were tried."""
    files = files_of(runtime.config)
    entries = await trio.to_thread.run_sync(_inbox_entries, files.root)
    tried = 0
    for source, path in entries:
        name = clean_name(path.name.removesuffix(REFUSED_SUFFIX))
        if path.name.endswith(REFUSED_SUFFIX):
            reason = await trio.to_thread.run_sync(_read_note, path)
            await _record_refusal(runtime, name=name, source=source, reason=reason)
            await trio.to_thread.run_sync(path.unlink)
            continue
        if _busy(runtime):
            break  # it waits for the next look
        try:
            can_take(runtime)  # no A/B slots, updates off: refused for good
            runtime.firmware.receiving = name
            digest, size = await trio.to_thread.run_sync(hash_file, path)
            await accept_file(runtime, path, size=size, sha256=digest.hexdigest(), name=name, source=source,
                              when=When(runtime.config.update.inbox_when))
        except IntakeRefused as exc:
            if exc.why == "busy":
                break  # it waits for the next look
            if exc.why == "runs":
                log.warning("update: %s from %s: %s", name, source, exc.message)
            elif exc.why != "signature":  # a refused signature is recorded already
                await _record_refusal(runtime, name=name, source=source, reason=exc.message)
        except OSError as exc:
            await _record_refusal(runtime, name=name, source=source, reason=f"it could not be read: {exc}")
        finally:
            runtime.firmware.receiving = ""
        tried += 1
        with trio.CancelScope(shield=True):  # tried: never again
            await trio.to_thread.run_sync(functools.partial(path.unlink, missing_ok=True))
    return tried


async def run_inbox(runtime: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Look at the inbox every ``[update] inbox_interval_s`` (a directory listing: cheap)."""
    task_status.started()
    while True:
        await take_inbox(runtime)
        await trio.sleep(runtime.config.update.inbox_interval_s)

"""The firmware update service (docs/updates.md): an offer from the platform is downloaded,
verified and installed in the maintenance window; after the reboot, the trial keeps the new
slot only once it proved healthy.

The path of one update, and who does each step:

1. The sync service hands the heartbeat answer's ``firmware`` offer to
   ``runtime.firmware`` and notifies ``runtime.firmware_changes``.
2. :meth:`FirmwareUpdates.fetch`: the bundle is downloaded to ``update/<sha256>.raucb`` on the
   data partition through the WAN path (the box's proxy and CA), resuming with ``Range``
   (the shared ``appliance.services.download``), then its size and sha256 are checked.
3. In the maintenance window (``[update] window``, the shop's local time), :func:`install_bundle`:
   RAUC checks the signature (``rauc info``: nothing written if it is refused), writes the
   inactive slot and selects it for the next boot, once; ``update/trial.json`` records the
   trial; the box asks root to reboot (``update/reboot``, a path unit in the image).
4. The new slot, before it opens the database (:func:`prepare_storage`, called by the
   supervisor), snapshots it. Its :meth:`FirmwareUpdates.trial` waits for READY and the core
   health checks (:func:`appliance.protocol.firmware.judge_trial`) within
   ``[update] trial_deadline_s``: good, RAUC marks the slot good and the outcome is
   "committed"; otherwise it marks it bad and asks for a reboot, and the bootloader (whose
   choice of the new slot was for one boot only) starts the old slot.
5. The old slot, back, restores the snapshot before it opens the database, carrying the
   shop's records of the trial over (``appliance.storage.trial``), and records
   "rolled_back". The heartbeat and the homepage say the outcome.

A bundle a person brought (the homepage's upload, a USB stick: ``services/firmware_intake.py``)
is checked the same way and waits as ``runtime.firmware.local`` (``update/local/``); it
goes before the platform's offer (a download under way stops and resumes later), at once
or in the window as the person chose, and takes the same trial.

A version that was rolled back or refused is not tried again by itself: the platform offers
another. Cancellation: a download stops between chunks and resumes later; an install under
way runs to its end (RAUC does not stop half-way either).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Final, TypeVar
from zoneinfo import ZoneInfo

import attrs
import httpx
import trio

from appliance import __version__
from appliance.config import Config
from appliance.protocol.backoff import Backoff
from appliance.protocol.firmware import (
    FirmwareError,
    FirmwareOffer,
    LocalBundle,
    MaintenanceWindow,
    Outcome,
    OutcomeKind,
    Phase,
    TrialRecord,
    Verdict,
    When,
    judge_trial,
    source_words,
)
from appliance.services.board import ServiceState
from appliance.services.download import DownloadError, drop_partial, partial_state, receive, request_headers
from appliance.services.installer import InstallerError, Rauc, booted_slot
from appliance.services.media_files import hash_file
from appliance.services.runtime import Runtime
from appliance.services.wan import WanConfigError, client_for, close_client, locate_failure, route
from appliance.storage import DATABASE_FILE
from appliance.storage.secrets import fsync_dir, write_atomic
from appliance.storage.trial import TrialStorageError, restore_snapshot, take_snapshot

__all__ = ["UPDATE_DIR", "BundleRefused", "FirmwareUpdates", "UpdateFiles", "install_bundle", "prepare_storage",
           "run_firmware"]

log = logging.getLogger(__name__)

T = TypeVar("T")

UPDATE_DIR: Final = "update"
# rauc info checks a signature (seconds); an install writes a slot (minutes); a mark, a variable.
INFO_DEADLINE_S: Final = 120.0
INSTALL_DEADLINE_S: Final = 1800.0
MARK_DEADLINE_S: Final = 60.0
# The window is looked at again at least this often (a changed offer or clock is seen).
WINDOW_RECHECK_S: Final = 300.0
SLOT_PAIRS: Final = {"A": "B", "B": "A"}
# Free space a bundle must leave on the data partition (the database, the media cache).
DISK_MARGIN_BYTES: Final = 256 * 2**20


class BundleRefused(Exception):
    """The bundle was refused before anything was written (size, hash, signature, version)."""


@attrs.frozen(kw_only=True)
class UpdateFiles:
    """The update's files on the data partition (``<storage.dir>/update``)."""

    root: Path

    @property
    def trial_path(self) -> Path:
        return self.root / "trial.json"

    @property
    def last_path(self) -> Path:
        return self.root / "last.json"

    @property
    def snapshot(self) -> Path:
        return self.root / "snapshot.db"

    @property
    def reboot(self) -> Path:
        """Root reboots the box when this appears (``appliance-reboot.path`` in the image)."""
        return self.root / "reboot"

    def bundle(self, sha256: str) -> Path:
        return self.root / f"{sha256}.raucb"

    @property
    def local_dir(self) -> Path:
        """A bundle a person brought, verified, and its record: apart from the offers' bundles."""
        return self.root / "local"

    @property
    def local_path(self) -> Path:
        return self.local_dir / "local.json"

    def local_bundle(self, sha256: str) -> Path:
        return self.local_dir / f"{sha256}.raucb"

    def read_local(self) -> LocalBundle | None:
        local = _read(self.local_path, LocalBundle.from_dict)
        return local if local is not None and self.local_bundle(local.sha256).is_file() else None

    def write_local(self, local: LocalBundle) -> None:
        _write_json(self.local_path, local.as_dict())

    def clear_local(self, keep: str = "") -> None:
        """Forget the bundle a person brought (and any other file there but ``keep``'s bundle)."""
        if not self.local_dir.is_dir():
            return
        for path in self.local_dir.iterdir():
            if not keep or path.name not in (f"{keep}.raucb", self.local_path.name):
                path.unlink(missing_ok=True)

    def trial_db(self, version: str) -> Path:
        return self.root / f"trial-{version}.db"

    def prepare(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.local_dir.mkdir(mode=0o700, exist_ok=True)

    def read_trial(self) -> TrialRecord | None:
        return _read(self.trial_path, TrialRecord.from_dict)

    def write_trial(self, trial: TrialRecord) -> None:
        _write_json(self.trial_path, trial.as_dict())

    def clear_trial(self) -> None:  # durable: a trial back after a power cut would be judged again
        self.trial_path.unlink(missing_ok=True)
        self.snapshot.unlink(missing_ok=True)
        fsync_dir(self.root)

    def read_last(self) -> Outcome | None:
        return _read(self.last_path, Outcome.from_dict)

    def write_last(self, outcome: Outcome) -> None:
        _write_json(self.last_path, outcome.as_dict())

    def request_reboot(self, reason: str) -> None:
        _write_json(self.reboot, {"reason": reason, "at": time.time()})

    def prune_bundles(self, keep: str = "") -> None:
        """Delete downloaded bundles (and partials) other than ``keep``'s."""
        for path in self.root.glob("*.raucb*"):
            if not keep or not path.name.startswith(keep):
                path.unlink(missing_ok=True)


def _read(path: Path, parse: Callable[[object], T]) -> T | None:
    try:
        return parse(json.loads(path.read_text("utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, FirmwareError) as exc:  # ValueError: not JSON
        log.error("update: %s cannot be read and is ignored: %s", path, exc)
        return None


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    """Written whole or not at all (a temporary file, fsynced, renamed): after a power cut
    the file is the old one or the new one."""
    write_atomic(path, json.dumps(obj, sort_keys=True), mode=0o600)


def files_of(config: Config) -> UpdateFiles:
    return UpdateFiles(root=Path(config.storage.dir) / UPDATE_DIR)


def read_booted(config: Config) -> str:
    """The booted slot ("" on a machine without the A/B layout)."""
    try:
        return booted_slot(Path(config.update.testing.cmdline or "/proc/cmdline").read_text("utf-8"))
    except OSError:
        return ""


def read_boot_id(config: Config) -> str:
    try:
        return Path(config.update.testing.boot_id or "/proc/sys/kernel/random/boot_id").read_text("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def installer(config: Config) -> Rauc:
    return Rauc(binary=config.update.testing.rauc or "rauc", keyring=config.update.keyring)


def prepare_storage(config: Config, *, now: float | None = None) -> str:
    """What this boot means for the database, before anything opens it (blocking; the
    supervisor calls it first). Returns what was done, in words ("" for nothing):

    - booted the trial's new slot for the first time: snapshot the database;
    - booted the old slot after the trial's boot (another boot id): the trial failed;
      restore the snapshot with the trial's records carried over, record "rolled_back".
    """
    files = files_of(config)
    trial = files.read_trial()
    if trial is None:
        return ""
    now = time.time() if now is None else now
    booted, boot_id = read_booted(config), read_boot_id(config)
    db_path = Path(config.storage.dir) / DATABASE_FILE
    if booted == trial.to_slot:
        if trial.snapshot or trial.verdict:
            return ""
        took = take_snapshot(db_path, files.snapshot)
        files.write_trial(attrs.evolve(trial, snapshot=True))
        log.info("update: on trial in slot %s (%s); database snapshot %s", booted, trial.version,
                 "taken" if took else "not needed (no database yet)")
        return "snapshot"
    if booted != trial.from_slot or (trial.boot_id and trial.boot_id == boot_id):
        return ""  # the reboot into the new slot is still due (same boot), or not our layout
    carried = 0
    words = ""
    if trial.snapshot and files.snapshot.is_file():
        try:
            result = restore_snapshot(db_path, files.snapshot, files.trial_db(trial.version))
        except TrialStorageError as exc:
            # The database stays as the trial left it; the old firmware then says so if it
            # cannot open it (a newer schema), and nothing is deleted.
            log.error("update: %s", exc)
            words = f"; the database could not be restored: {exc}"
        else:
            carried = result.total
            words = f"; database restored, {carried} record(s) of the trial carried over"
            if result.skipped:
                words += f" (tables not carried: {', '.join(result.skipped)})"
    elif trial.snapshot and db_path.exists():
        # There was no database before the trial: the trial's own, perhaps of a newer
        # schema, is set aside (kept for support) and this firmware starts a new one.
        aside = files.trial_db(trial.version)
        for suffix in ("", "-wal", "-shm"):
            src = db_path.with_name(db_path.name + suffix)
            if src.exists():
                os.replace(src, aside.with_name(aside.name + suffix))
        words = "; the trial's database was set aside (there was none before it)"
    reason = trial.reason or "the new firmware did not confirm itself; the bootloader went back"
    outcome = Outcome(version=trial.version, kind=OutcomeKind.ROLLED_BACK, at=now, reason=reason + words,
                      slot=booted, carried=carried, source=trial.source)
    files.write_last(outcome)
    files.clear_trial()
    log.warning("update: %s was rolled back to slot %s: %s", trial.version, booted, outcome.reason)
    return "restored"


async def install_bundle(config: Config, files: UpdateFiles, bundle: Path, *, booted: str, boot_id: str,
                         expect_version: str = "", now: float, source: str = "platform") -> TrialRecord:
    """Check the bundle's signature, install it into the inactive slot, record the trial.
    The caller asks for the reboot. :class:`BundleRefused` before anything is written;
    :class:`InstallerError` when RAUC fails to install."""
    to_slot = SLOT_PAIRS.get(booted, "")
    if not to_slot:
        raise InstallerError("this box has no A/B system slots (no rauc.slot= on its kernel command line); "
                             "it is updated by flashing a new image")
    rauc = installer(config)
    try:
        with trio.fail_after(INFO_DEADLINE_S):
            info = await rauc.info(bundle)
    except InstallerError as exc:
        raise BundleRefused(f"the bundle is refused: {exc}") from exc
    if expect_version and info.version != expect_version:
        raise BundleRefused(f"the bundle is version {info.version}, {source_words(source)} said {expect_version}")
    with trio.fail_after(INSTALL_DEADLINE_S):
        await rauc.install(bundle)
    trial = TrialRecord(version=info.version, from_version=__version__, from_slot=booted, to_slot=to_slot,
                        started_at=now, boot_id=boot_id, source=source)
    await trio.to_thread.run_sync(files.write_trial, trial)
    log.warning("update: %s installed into slot %s; rebooting into it on trial", info.version, to_slot)
    return trial


class FirmwareUpdates:
    """The service's work, on the runtime's status record (``runtime.firmware``)."""

    def __init__(self, runtime: Runtime, *, clock: Callable[[], float] = time.time) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.cfg = runtime.config.update
        self.status = runtime.firmware
        self.files = files_of(runtime.config)
        self.clock = clock
        self.window = MaintenanceWindow.parse(self.cfg.window)
        self.backoff = Backoff(self.cfg.retry_initial_s, max(self.cfg.retry_initial_s, self.cfg.retry_max_s))
        # The offer being acted on; cancelled when a person brings a bundle (it goes first).
        self._offer_scope: trio.CancelScope | None = None

    # --- the trial ------------------------------------------------------------------------

    async def trial(self, trial: TrialRecord) -> None:
        """Judge this boot of a new slot: keep it (mark good) or go back (mark bad, reboot)."""
        st = self.status
        st.phase, st.trial = Phase.TRIAL, trial
        start = trio.current_time()
        rauc = installer(self.config)
        while True:
            checks = await self.runtime.health.latest()
            down = [s.name for s in self.runtime.board.all()
                    if s.core and s.state in (ServiceState.FAILED, ServiceState.RESTARTING)]
            judgement = judge_trial(ready=self.runtime.ready.is_set(), checks=checks, failed_services=down,
                                    elapsed_s=trio.current_time() - start, deadline_s=self.cfg.trial_deadline_s)
            if judgement.verdict is Verdict.GOOD:
                try:
                    with trio.fail_after(MARK_DEADLINE_S):
                        await rauc.mark("good")
                except (InstallerError, trio.TooSlowError) as exc:
                    judgement = judge_trial(ready=False, checks=checks, failed_services=down,
                                            elapsed_s=trio.current_time() - start,
                                            deadline_s=self.cfg.trial_deadline_s)
                    st.error = f"cannot mark this slot good: {exc}"
                    log.error("update: %s", st.error)
                else:
                    outcome = Outcome(version=trial.version, kind=OutcomeKind.COMMITTED, at=self.clock(),
                                      reason=judgement.reason, slot=trial.to_slot, source=trial.source)
                    await trio.to_thread.run_sync(self._commit, outcome)
                    st.phase, st.trial, st.last, st.error = Phase.IDLE, None, outcome, ""
                    log.info("update: %s committed in slot %s: %s", trial.version, trial.to_slot, judgement.reason)
                    self.runtime.firmware_changes.notify()
                    return
            if judgement.verdict is Verdict.BAD:
                await self.give_up(trial, judgement.reason, rauc)
                return
            st.error = "" if judgement.verdict is Verdict.PENDING and not st.error else st.error
            await trio.sleep(self.cfg.check_interval_s)

    def _commit(self, outcome: Outcome) -> None:
        self.files.write_last(outcome)
        self.files.clear_trial()
        self.files.prune_bundles()

    async def give_up(self, trial: TrialRecord, reason: str, rauc: Rauc) -> None:
        """Mark the slot bad, say why for the old slot to report, ask for the reboot."""
        st = self.status
        log.error("update: %s failed its trial: %s; going back to slot %s", trial.version, reason, trial.from_slot)
        await trio.to_thread.run_sync(self.files.write_trial, attrs.evolve(trial, verdict="bad", reason=reason))
        try:
            with trio.fail_after(MARK_DEADLINE_S):
                await rauc.mark("bad")
        except (InstallerError, trio.TooSlowError) as exc:
            # The bootloader's choice of this slot was for one boot: the reboot goes back anyway.
            log.error("update: cannot mark this slot bad (%s); rebooting all the same", exc)
        st.phase, st.error = Phase.REBOOTING, reason
        await trio.to_thread.run_sync(self.files.request_reboot, f"{trial.version} failed its trial: {reason}")

    # --- an offer ---------------------------------------------------------------------------

    def wanted(self, offer: FirmwareOffer | None) -> bool:
        """An offer to act on: not what runs (the package's version, or the bundle version
        last committed), not a version that was rolled back or refused here."""
        if offer is None or offer.version == __version__ or not self.status.slot or self.status.trial is not None:
            return False
        last = self.status.last
        return not (last is not None and last.version == offer.version
                    and last.kind in (OutcomeKind.COMMITTED, OutcomeKind.ROLLED_BACK, OutcomeKind.REFUSED))

    async def fetch(self, offer: FirmwareOffer) -> Path:
        """Download (or resume) the offered bundle and check its size and sha256."""
        st = self.status
        path = self.files.bundle(offer.sha256)
        partial = path.with_name(path.name + ".part")
        if path.is_file():
            return path
        await trio.to_thread.run_sync(self.files.prune_bundles, offer.sha256)  # an earlier offer's
        have, etag = await trio.to_thread.run_sync(partial_state, partial)
        free = (await trio.to_thread.run_sync(shutil.disk_usage, self.files.root)).free
        if free - (offer.size - have) < DISK_MARGIN_BYTES:
            raise DownloadError(f"firmware {offer.version} ({offer.size} bytes) would leave less than "
                                f"{DISK_MARGIN_BYTES // 2**20} MiB free on the data partition")
        if have > offer.size or (have and not etag):
            await trio.to_thread.run_sync(drop_partial, partial)
            have, etag = 0, ""
        st.phase, st.done_bytes = Phase.DOWNLOADING, have
        target = route(offer.url, self.config.wan, ca_file=self.config.cloud.ca_file)
        cloud = self.config.cloud
        client = client_for(target, connect_timeout_s=cloud.connect_timeout_s, read_timeout_s=cloud.read_timeout_s)

        async def progress(n: int) -> None:
            st.done_bytes += n

        name = f"firmware {offer.version}"
        try:
            for attempt in range(2):  # a 412 (the file changed) starts again from 0 once
                try:
                    if have < offer.size:
                        async with client.stream("GET", offer.url, headers=request_headers(have, etag)) as response:
                            have = await receive(response, partial, name=name, have=have, size=offer.size,
                                                 on_chunk=progress)
                    break
                except DownloadError as exc:
                    if exc.restart and attempt == 0:
                        have, etag = 0, ""
                        continue
                    if exc.oversize:
                        raise BundleRefused(exc.message) from exc
                    raise
        except httpx.HTTPError as exc:
            raise DownloadError(locate_failure(exc, url=offer.url, proxy=target.proxy).message) from exc
        finally:
            await close_client(client)
        if have != offer.size:
            raise DownloadError(f"{name}: the download stopped at {have} of {offer.size} bytes")
        digest, _ = await trio.to_thread.run_sync(hash_file, partial)
        if digest.hexdigest() != offer.sha256:
            await trio.to_thread.run_sync(drop_partial, partial)
            raise BundleRefused(f"{name}: the bytes received do not match the offer's sha256")
        await trio.to_thread.run_sync(_place, partial, path)
        return path

    def window_wait_s(self) -> float:
        tz = ZoneInfo(self.cfg.timezone) if self.cfg.timezone else None
        local = datetime.fromtimestamp(self.clock(), tz)
        return self.window.wait_s(local.hour * 3600 + local.minute * 60 + local.second + local.microsecond / 1e6)

    async def offer_once(self, offer: FirmwareOffer) -> None:
        """Download, verify, wait for the window, install and ask for the reboot. Raises
        :class:`DownloadError`, :class:`BundleRefused` or :class:`InstallerError`."""
        st = self.status
        path = await self.fetch(offer)
        while (wait := self.window_wait_s()) > 0:
            st.phase, st.window_opens_in_s = Phase.WAITING, wait
            seen = self.runtime.firmware_changes.version
            with trio.move_on_after(min(wait, WINDOW_RECHECK_S)):
                await self.runtime.firmware_changes.wait(seen)
            if st.offer != offer:
                return
        if st.local is not None:
            return  # a person brought a bundle meanwhile: it goes first
        st.phase, st.window_opens_in_s = Phase.INSTALLING, None
        booted = st.slot
        with trio.CancelScope(shield=True):  # RAUC does not stop half-way either
            trial = await install_bundle(self.config, self.files, path, booted=booted,
                                         boot_id=read_boot_id(self.config), expect_version=offer.version,
                                         now=self.clock())
            st.trial, st.phase = trial, Phase.REBOOTING
            await trio.to_thread.run_sync(self.files.request_reboot, f"installed {trial.version} into {trial.to_slot}")

    async def offers(self) -> None:
        """Act on each offer in turn; a failure is shown and tried again after a backoff."""
        st = self.status
        while True:
            seen = self.runtime.firmware_changes.version
            offer = st.offer
            delay: float | None = None
            if st.phase is Phase.REBOOTING:
                pass  # waiting for root to reboot the box
            elif st.local is not None:
                await self.local_once(st.local)
            elif self.wanted(offer):
                assert offer is not None
                try:
                    with trio.CancelScope() as self._offer_scope:
                        await self.offer_once(offer)
                    self._offer_scope = None
                    self.backoff.reset()
                except BundleRefused as exc:
                    await self._refused(offer.version, str(exc), "platform")
                except (DownloadError, InstallerError, trio.TooSlowError, OSError, WanConfigError) as exc:
                    st.phase, st.error = Phase.FAILED, str(exc) or type(exc).__name__
                    delay = self.backoff.next_delay()
                    log.warning("update: %s: %s; next try in %.0f s", offer.version, st.error, delay)
            elif st.phase in (Phase.DOWNLOADING, Phase.WAITING, Phase.FAILED):
                st.phase = Phase.IDLE
            if st.phase is Phase.REBOOTING:
                await trio.sleep_forever()
            with trio.move_on_after(delay if delay is not None else float("inf")):
                await self.runtime.firmware_changes.wait(seen)

    async def _refused(self, version: str, reason: str, source: str, kind: OutcomeKind = OutcomeKind.REFUSED) -> None:
        st = self.status
        outcome = Outcome(version=version, kind=kind, at=self.clock(), reason=reason, slot=st.slot, source=source)
        await trio.to_thread.run_sync(self.files.write_last, outcome)
        await trio.to_thread.run_sync(self.files.prune_bundles)
        st.phase, st.last, st.error = Phase.IDLE, outcome, ""
        log.error("update: %s %s: %s", version, kind, reason)

    # --- a bundle a person brought -----------------------------------------------------------

    async def preempt(self) -> None:
        """Stop acting on the platform's offer when a person brings a bundle (a download
        stops between chunks and resumes later; an install under way is shielded)."""
        while True:
            seen = self.runtime.firmware_changes.version
            await self.runtime.firmware_changes.wait(seen)
            if self.status.local is not None and self._offer_scope is not None:
                self._offer_scope.cancel()

    async def local_once(self, local: LocalBundle) -> None:
        """Install the bundle a person brought: now, or in the window as they chose. Its end,
        good or bad, is the last outcome; it is not tried again by itself."""
        st = self.status
        while local.when is When.WINDOW and (wait := self.window_wait_s()) > 0:
            st.phase, st.window_opens_in_s = Phase.WAITING, wait
            seen = self.runtime.firmware_changes.version
            with trio.move_on_after(min(wait, WINDOW_RECHECK_S)):
                await self.runtime.firmware_changes.wait(seen)
            if st.local != local:
                return  # replaced by another bundle
        st.phase, st.window_opens_in_s, st.error = Phase.INSTALLING, None, ""
        path = self.files.local_bundle(local.sha256)
        with trio.CancelScope(shield=True):  # RAUC does not stop half-way either
            try:
                trial = await install_bundle(self.config, self.files, path, booted=st.slot,
                                             boot_id=read_boot_id(self.config), expect_version=local.version,
                                             now=self.clock(), source=local.source)
            except BundleRefused as exc:
                await self._local_done(local)
                await self._refused(local.version, str(exc), local.source)
                return
            except (InstallerError, trio.TooSlowError, OSError) as exc:
                await self._local_done(local)
                await self._refused(local.version, f"the install failed; the running firmware is unchanged: "
                                                   f"{exc or type(exc).__name__}", local.source, OutcomeKind.FAILED)
                return
            await self._local_done(local)
            st.trial, st.phase = trial, Phase.REBOOTING
            words = f"installed {trial.version} into {trial.to_slot} from {source_words(local.source)}"
            await trio.to_thread.run_sync(self.files.request_reboot, words)

    async def _local_done(self, local: LocalBundle) -> None:  # tried: deleted, never installed again
        await trio.to_thread.run_sync(self.files.clear_local)
        if self.status.local == local:
            self.status.local = None


def _place(partial: Path, path: Path) -> None:
    fd = os.open(partial, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, path)
    drop_partial(partial)


async def run_firmware(runtime: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """The update service: the trial of a new slot (if this boot is one), then the offers."""
    updates = FirmwareUpdates(runtime)
    st, files = runtime.firmware, updates.files
    await trio.to_thread.run_sync(files.prepare)
    st.version, st.slot = __version__, await trio.to_thread.run_sync(read_booted, runtime.config)
    st.last = await trio.to_thread.run_sync(files.read_last)
    trial = await trio.to_thread.run_sync(files.read_trial)
    local = await trio.to_thread.run_sync(files.read_local)
    if local is not None and (trial is not None or local.version == __version__):
        local = None  # installed already (the trial is its own), or it runs: not again
    # Anything else there is a bundle already tried, or an upload cut short by a restart.
    await trio.to_thread.run_sync(files.clear_local, local.sha256 if local else "")
    st.local = local
    task_status.started()
    async with trio.open_nursery() as nursery:
        if trial is not None and st.slot == trial.to_slot:
            if trial.verdict == "bad":  # judged already; the reboot did not happen yet
                st.phase, st.trial, st.error = Phase.REBOOTING, trial, trial.reason
                await trio.to_thread.run_sync(files.request_reboot, f"{trial.version} failed its trial")
            else:
                nursery.start_soon(updates.trial, trial)
        elif trial is not None and st.slot == trial.from_slot:
            st.phase, st.trial = Phase.REBOOTING, trial  # installed in this boot; the reboot is due
        nursery.start_soon(updates.preempt)
        nursery.start_soon(updates.offers)

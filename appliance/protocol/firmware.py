"""Firmware updates, sans-I/O: the platform's offer, the maintenance window, the trial's verdict.

docs/updates.md says the whole path; this module holds its pure rules:

- :func:`parse_offer`: the ``firmware`` object of a heartbeat answer
  (docs/cloud-contract.md, "Heartbeat"), or :class:`FirmwareError`.
- :class:`MaintenanceWindow`: when an install may start (local wall-clock minutes, a window
  may cross midnight); :meth:`~MaintenanceWindow.wait_s` says how long until it opens.
- :func:`judge_trial`: after booting a new slot, GOOD once the box is READY and its core
  health checks pass, BAD once the deadline passed without that, else PENDING.
- :class:`TrialRecord` and :class:`Outcome`: what the data partition keeps about a trial
  and about the last update, as JSON objects (their parsers refuse anything else).
- :class:`LocalBundle`: a bundle a person brought (the homepage's upload, a USB stick),
  verified and waiting for its install: now or in the window (:class:`When`).
- :class:`FirmwareStatus`: what the update service is doing (homepage, heartbeat).

Exceptions: :class:`FirmwareError` (an offer, a window or a record that does not follow
its rules).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import attrs

from appliance.protocol.health import Check, Status

__all__ = [
    "BUNDLE_MAX_BYTES",
    "CORE_CHECK_PREFIXES",
    "FirmwareError",
    "FirmwareOffer",
    "FirmwareStatus",
    "LocalBundle",
    "MaintenanceWindow",
    "Outcome",
    "OutcomeKind",
    "Phase",
    "TrialJudgement",
    "TrialRecord",
    "Verdict",
    "When",
    "judge_trial",
    "parse_offer",
    "source_words",
]

# An update bundle is a root filesystem image plus a signature: a few hundred MiB. Anything
# above this is not ours, and would not fit the data partition's margin anyway.
BUNDLE_MAX_BYTES: Final = 2 * 1024**3
URL_MAX: Final = 2048
_VERSION: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+~_-]{0,63}")
_SHA256: Final = re.compile(r"[0-9a-f]{64}")
_SLOT: Final = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_HHMM: Final = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")
# Where an update came from: the platform's offer, or a bundle a person brought.
SOURCES: Final = ("platform", "upload", "usb", "boot")
_NAME_MAX: Final = 255
# The health checks that decide a trial: what the box needs to serve the shop, whatever the
# shop's internet does (a WAN outage during the trial must not roll a good firmware back).
CORE_CHECK_PREFIXES: Final = ("lan.", "system.disk", "system.fs", "firewall")


class FirmwareError(ValueError):
    """An offer, a window or a record that does not follow its rules (the text says which)."""


@attrs.frozen(kw_only=True)
class FirmwareOffer:
    """A firmware the platform offers: a signed bundle on blob storage."""

    version: str
    url: str
    size: int
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "url": self.url, "size": self.size, "sha256": self.sha256}


def _field(obj: Mapping[str, Any], name: str, kind: type, where: str) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise FirmwareError(f"{where}.{name}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def parse_offer(value: object, *, where: str = "firmware") -> FirmwareOffer | None:
    """The offer in a heartbeat answer's ``firmware`` field (``None`` or absent: no offer)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise FirmwareError(f"{where}: expected an object or null, got {type(value).__name__}")
    version = _field(value, "version", str, where)
    if not _VERSION.fullmatch(version):
        raise FirmwareError(f"{where}.version: 1 to 64 of A-Z a-z 0-9 . + ~ _ -, starting with a letter or digit")
    url = _field(value, "url", str, where)
    if not url.startswith("https://") or len(url) > URL_MAX or any(c.isspace() for c in url):
        raise FirmwareError(f"{where}.url: an https:// URL of at most {URL_MAX} characters")
    size = _field(value, "size", int, where)
    if not 0 < size <= BUNDLE_MAX_BYTES:
        raise FirmwareError(f"{where}.size: 1 to {BUNDLE_MAX_BYTES} bytes")
    sha256 = _field(value, "sha256", str, where)
    if not _SHA256.fullmatch(sha256):
        raise FirmwareError(f"{where}.sha256: 64 lower-case hex digits")
    return FirmwareOffer(version=version, url=url, size=size, sha256=sha256)


@attrs.frozen(kw_only=True)
class MaintenanceWindow:
    """Minutes after local midnight: [start, end); start > end crosses midnight; equal: always."""

    start_min: int
    end_min: int

    @classmethod
    def parse(cls, text: str) -> MaintenanceWindow:
        """``"HH:MM-HH:MM"`` (24-hour, local time of the shop)."""
        parts = text.split("-")
        if len(parts) != 2:
            raise FirmwareError(f"not a window such as 02:00-05:00: {text!r}")
        minutes = []
        for part in parts:
            match = _HHMM.fullmatch(part.strip())
            if match is None:
                raise FirmwareError(f"not a time such as 02:00: {part.strip()!r} (in {text!r})")
            minutes.append(int(match[1]) * 60 + int(match[2]))
        return cls(start_min=minutes[0], end_min=minutes[1])

    def wait_s(self, now_s: float) -> float:
        """Seconds from ``now_s`` (seconds since the shop's local midnight) until the window
        is open; 0 inside it."""
        if self.start_min == self.end_min:
            return 0.0
        start_s, end_s = self.start_min * 60, self.end_min * 60
        inside = start_s <= now_s < end_s if start_s < end_s else now_s >= start_s or now_s < end_s
        if inside:
            return 0.0
        return (start_s - now_s) % 86400.0


class Verdict(enum.StrEnum):
    PENDING = "pending"
    GOOD = "good"
    BAD = "bad"


@attrs.frozen(kw_only=True)
class TrialJudgement:
    verdict: Verdict
    reason: str


def judge_trial(*, ready: bool, checks: Sequence[Check], failed_services: Iterable[str], elapsed_s: float,
                deadline_s: float, prefixes: Sequence[str] = CORE_CHECK_PREFIXES) -> TrialJudgement:
    """GOOD when READY, no core service down and every core check present passes (warn is a
    pass: a disk getting full is no reason to go back); BAD once ``deadline_s`` passed
    without that, with the reason that held it back; else PENDING."""
    down = sorted(failed_services)
    core = [c for c in checks if c.name.startswith(tuple(prefixes))]
    failing = [c for c in core if c.status is Status.FAIL]
    if not ready:
        reason = "the appliance did not reach READY"
    elif down:
        reason = f"core service(s) down: {', '.join(down)}"
    elif not core:
        reason = "no core health check has reported yet"
    elif failing:
        reason = "; ".join(f"{c.name}: {c.message}" for c in failing[:3])
    else:
        return TrialJudgement(verdict=Verdict.GOOD,
                              reason=f"READY and {len(core)} core health checks pass after {elapsed_s:.0f} s")
    if elapsed_s >= deadline_s:
        return TrialJudgement(verdict=Verdict.BAD, reason=f"not healthy within {deadline_s:g} s: {reason}")
    return TrialJudgement(verdict=Verdict.PENDING, reason=reason)


def _str(obj: Mapping[str, Any], name: str, where: str, *, pattern: re.Pattern[str] | None = None,
         optional: bool = False) -> str:
    value = obj.get(name)
    if value is None and optional:
        return ""
    if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
        raise FirmwareError(f"{where}.{name}: not a valid value: {value!r}")
    return value


def _num(obj: Mapping[str, Any], name: str, where: str) -> float:
    value = obj.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise FirmwareError(f"{where}.{name}: expected a number, got {type(value).__name__}")
    return float(value)


@attrs.frozen(kw_only=True)
class TrialRecord:
    """A trial in progress, kept on the data partition (``update/trial.json``).

    Written by the slot that installed the update just before it reboots; the new slot adds
    ``snapshot`` when it copied the database before opening it, and ``verdict`` when it
    judged itself. Whichever slot boots next reads it: the new one (booted == ``to_slot``)
    is on trial; the old one (booted == ``from_slot``) knows the trial failed.
    """

    version: str
    from_version: str
    from_slot: str
    to_slot: str
    started_at: float
    boot_id: str = ""  # the boot that installed it: the same boot id means the reboot is still due
    snapshot: bool = False
    verdict: str = ""  # "", "good" or "bad"
    reason: str = ""
    source: str = "platform"  # SOURCES

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, obj: object, *, where: str = "trial") -> TrialRecord:
        if not isinstance(obj, Mapping):
            raise FirmwareError(f"{where}: expected an object")
        snapshot = obj.get("snapshot", False)
        verdict = obj.get("verdict", "")
        if not isinstance(snapshot, bool) or verdict not in ("", "good", "bad"):
            raise FirmwareError(f"{where}: snapshot must be true/false and verdict '', 'good' or 'bad'")
        return cls(version=_str(obj, "version", where, pattern=_VERSION),
                   from_version=_str(obj, "from_version", where, pattern=_VERSION),
                   from_slot=_str(obj, "from_slot", where, pattern=_SLOT),
                   to_slot=_str(obj, "to_slot", where, pattern=_SLOT),
                   started_at=_num(obj, "started_at", where), boot_id=_str(obj, "boot_id", where, optional=True),
                   snapshot=snapshot, verdict=verdict,
                   reason=_str(obj, "reason", where, optional=True), source=_source(obj, where))


class OutcomeKind(enum.StrEnum):
    COMMITTED = "committed"  # the new slot proved healthy and is kept
    ROLLED_BACK = "rolled_back"  # the trial failed; the box came back on the old slot
    REFUSED = "refused"  # the bundle was refused before anything was written (hash, signature)
    FAILED = "failed"  # the install itself failed; the running slot is unchanged


@attrs.frozen(kw_only=True)
class Outcome:
    """How the last update ended (``update/last.json``): the homepage and the heartbeat say it."""

    version: str
    kind: OutcomeKind
    at: float
    reason: str = ""
    slot: str = ""  # the slot running afterwards
    carried: int = 0  # rows of the trial's database carried into the restored one (rollback)
    source: str = "platform"  # SOURCES

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "outcome": str(self.kind), "at": self.at, "reason": self.reason,
                "slot": self.slot, "carried": self.carried, "source": self.source}

    @classmethod
    def from_dict(cls, obj: object, *, where: str = "outcome") -> Outcome:
        if not isinstance(obj, Mapping):
            raise FirmwareError(f"{where}: expected an object")
        try:
            kind = OutcomeKind(str(obj.get("outcome")))
        except ValueError as exc:
            raise FirmwareError(f"{where}.outcome: one of {', '.join(OutcomeKind)}") from exc
        carried = obj.get("carried", 0)
        if not isinstance(carried, int) or isinstance(carried, bool) or carried < 0:
            raise FirmwareError(f"{where}.carried: an integer >= 0")
        return cls(version=_str(obj, "version", where), kind=kind, at=_num(obj, "at", where),
                   reason=_str(obj, "reason", where, optional=True), slot=_str(obj, "slot", where, optional=True),
                   carried=carried, source=_source(obj, where))


def _source(obj: Mapping[str, Any], where: str) -> str:
    source = obj.get("source", "platform")  # records written before there were other sources
    if source not in SOURCES:
        raise FirmwareError(f"{where}.source: one of {', '.join(SOURCES)}")
    return str(source)


def source_words(source: str) -> str:
    """Where an update came from, in the words of a sentence ("... the upload said ...")."""
    return {"platform": "the offer", "upload": "the upload", "usb": "the USB stick",
            "boot": "the boot partition"}.get(source, source)


class When(enum.StrEnum):
    """When a bundle a person brought is installed."""

    NOW = "now"  # at once: a technician with the box in front of them
    WINDOW = "window"  # in the maintenance window, as the platform's offers


@attrs.frozen(kw_only=True)
class LocalBundle:
    """A bundle a person brought, its signature checked, waiting for its install
    (``update/local/local.json``, beside the bundle ``<sha256>.raucb``)."""

    version: str
    sha256: str
    size: int
    source: str  # SOURCES, not "platform"
    name: str  # the file's name as it was brought, for people
    when: When
    at: float  # when it was accepted

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "sha256": self.sha256, "size": self.size, "source": self.source,
                "name": self.name, "when": str(self.when), "at": self.at}

    @classmethod
    def from_dict(cls, obj: object, *, where: str = "local") -> LocalBundle:
        if not isinstance(obj, Mapping):
            raise FirmwareError(f"{where}: expected an object")
        size = obj.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= BUNDLE_MAX_BYTES:
            raise FirmwareError(f"{where}.size: 1 to {BUNDLE_MAX_BYTES} bytes")
        try:
            when = When(str(obj.get("when")))
        except ValueError as exc:
            raise FirmwareError(f"{where}.when: one of {', '.join(When)}") from exc
        name = _str(obj, "name", where)
        if len(name) > _NAME_MAX:
            raise FirmwareError(f"{where}.name: at most {_NAME_MAX} characters")
        return cls(version=_str(obj, "version", where, pattern=_VERSION),
                   sha256=_str(obj, "sha256", where, pattern=_SHA256), size=size, source=_source(obj, where),
                   name=name, when=when, at=_num(obj, "at", where))


class Phase(enum.StrEnum):
    IDLE = "idle"  # nothing offered, or the offer is what runs
    DOWNLOADING = "downloading"
    WAITING = "waiting"  # verified, waiting for the maintenance window
    INSTALLING = "installing"
    REBOOTING = "rebooting"
    TRIAL = "trial"  # booted on a new slot, proving itself
    FAILED = "failed"  # the last attempt failed (reason in ``error``); retried later


@attrs.define(kw_only=True)
class FirmwareStatus:
    """What the update service is doing. Written by the update service; the sync service
    hands it the platform's offers (:meth:`offer_from_platform`)."""

    version: str = ""
    slot: str = ""  # the booted slot ("" where the box has no A/B layout: a developer machine)
    phase: Phase = Phase.IDLE
    offer: FirmwareOffer | None = None
    offer_error: str = ""
    done_bytes: int = 0
    error: str = ""
    window_opens_in_s: float | None = None
    trial: TrialRecord | None = None
    last: Outcome | None = None
    local: LocalBundle | None = None  # a bundle a person brought, waiting for its install
    # A bundle being received or checked right now (the upload's or the inbox's words), "" when none.
    receiving: str = ""

    def offered(self, value: object) -> bool:
        """The ``firmware`` field of a heartbeat answer; True when the offer changed. An offer
        that breaks the contract is kept as ``offer_error`` and changes nothing else."""
        try:
            offer = parse_offer(value)
        except FirmwareError as exc:
            self.offer_error = f"the platform's firmware offer is not valid: {exc}"
            return False
        self.offer_error = ""
        if offer == self.offer:
            return False
        self.offer = offer
        return True

    def report(self) -> dict[str, Any]:
        """The heartbeat's ``update`` object and the homepage's data."""
        return {
            "version": self.version,
            "slot": self.slot or None,
            "phase": str(self.phase),
            "offered": self.offer.version if self.offer else None,
            "done_bytes": self.done_bytes if self.phase is Phase.DOWNLOADING else None,
            "error": self.error or self.offer_error or None,
            "trial": None if self.trial is None else {"version": self.trial.version, "from": self.trial.from_version,
                                                      "source": self.trial.source},
            "last": None if self.last is None else self.last.as_dict(),
            "local": None if self.local is None else self.local.as_dict(),
            "receiving": self.receiving or None,
        }

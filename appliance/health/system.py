"""Checks of the machine itself: disk space, filesystem errors, clock, temperature, throttling.

Each reads a few small files under /sys, /proc or /run (in a worker thread: /sys reads can
block on a slow SD card) and answers with words for a technician. A check whose source
does not exist on this machine (no thermal zone on a VM, no Raspberry Pi firmware) is
left out rather than reported as a problem.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Final

import trio

from appliance.protocol.health import Check, Status
from appliance.protocol.text import Number, Text, join

__all__ = ["SystemPaths", "system_checks"]

# Below either of these the box warns, then fails: SQLite needs room to checkpoint its WAL.
DISK_WARN_FREE: Final = 0.15
DISK_FAIL_FREE: Final = 0.05
DISK_FAIL_BYTES: Final = 200 * 1024 * 1024
# Raspberry Pi 4/5 throttle at 80-85 °C.
TEMP_WARN_C: Final = 75.0
TEMP_FAIL_C: Final = 82.0
# A clock before this is certainly wrong (no RTC on a Pi): TLS certificates will not verify.
EARLIEST_PLAUSIBLE: Final = time.mktime((2026, 1, 1, 0, 0, 0, 0, 0, -1))

# get_throttled bits (Raspberry Pi firmware): now / since boot.
_THROTTLE_BITS: Final = {
    0: Text("under-voltage now"), 1: Text("ARM frequency capped now"), 2: Text("throttled now"),
    3: Text("soft temperature limit now"), 16: Text("under-voltage has occurred"),
    17: Text("frequency capping has occurred"), 18: Text("throttling has occurred"),
    19: Text("soft temperature limit has occurred"),
}


class SystemPaths:
    """Where the machine's facts are read from; tests point these at a fake tree."""

    def __init__(self, root: Path = Path("/")) -> None:
        self.thermal = root / "sys/class/thermal"
        self.throttled = root / "sys/devices/platform/soc/soc:firmware/get_throttled"
        self.ext4 = root / "sys/fs/ext4"
        self.timesync = root / "run/systemd/timesync/synchronized"
        self.timesyncd_present = root / "lib/systemd/systemd-timesyncd"


def _disk(state_dir: Path) -> Check:
    target = state_dir if state_dir.exists() else state_dir.parent
    try:
        usage = shutil.disk_usage(target)
    except OSError as exc:
        return Check(name="system.disk", status=Status.FAIL, message=Text("cannot read disk usage of {path}: {error}",
                                                                          path=str(target), error=str(exc)),
                     fix=Text("check that the data partition is mounted"))
    free = usage.free / usage.total if usage.total else 0.0
    data = {"path": str(target), "free_bytes": usage.free, "total_bytes": usage.total, "free_ratio": round(free, 3)}
    words = Text("{free} GiB free of {total} GiB ({percent}%)", free=Number(usage.free / 2**30, 1),
                 total=Number(usage.total / 2**30, 1), percent=Number(free * 100))
    if free < DISK_FAIL_FREE or usage.free < DISK_FAIL_BYTES:
        return Check(name="system.disk", status=Status.FAIL, message=Text("disk almost full: {words}", words=words),
                     data=data,
                     fix=Text("free space on the data partition or replace the SD card with a larger one"))
    if free < DISK_WARN_FREE:
        return Check(name="system.disk", status=Status.WARN, message=Text("disk getting full: {words}", words=words),
                     data=data,
                     fix=Text("plan to free space; the box needs room for its database and media cache"))
    return Check(name="system.disk", status=Status.OK, message=words, data=data)


def _fs_errors(paths: SystemPaths) -> list[Check]:
    checks = []
    try:
        devices = sorted(p for p in paths.ext4.iterdir() if (p / "errors_count").exists())
    except OSError:
        return []
    for dev in devices:
        try:
            count = int((dev / "errors_count").read_text().strip() or 0)
        except (OSError, ValueError):
            continue
        if count:
            checks.append(Check(name=f"system.fs.{dev.name}", status=Status.FAIL,
                                message=Text("the filesystem on {device} has recorded {count} error(s)",
                                             device=dev.name, count=count),
                                fix=Text("the SD card may be failing: back up, then replace it; run fsck at next boot"),
                                data={"device": dev.name, "errors": count}))
        else:
            checks.append(Check(name=f"system.fs.{dev.name}", status=Status.OK,
                                message=Text("no filesystem errors on {device}",
                                             device=dev.name), data={"device": dev.name}))
    return checks


def _clock(paths: SystemPaths, now: float) -> Check:
    if now < EARLIEST_PLAUSIBLE:
        return Check(name="system.clock", status=Status.FAIL,
                     message=Text("the clock says {date}, which cannot be right",
                                  date=time.strftime("%Y-%m-%d", time.gmtime(now))),
                     fix=Text("let NTP (UDP 123) through the firewall; "
                              "TLS to the platform fails until the clock is set"),
                     data={"now": now})
    if paths.timesync.exists():
        return Check(name="system.clock", status=Status.OK, message=Text("clock synchronised by NTP"),
                     data={"now": now})
    if paths.timesyncd_present.exists():
        return Check(name="system.clock", status=Status.WARN, message=Text("clock not (yet) synchronised by NTP"),
                     fix=Text("check that the box can reach its NTP servers (UDP 123); `timedatectl timesync-status`"),
                     data={"now": now})
    return Check(name="system.clock", status=Status.OK, message=Text("clock plausible (no NTP client to ask)"),
                 data={"now": now})


def _temperature(paths: SystemPaths) -> list[Check]:
    try:
        zones = sorted(paths.thermal.glob("thermal_zone*/temp"))
    except OSError:
        return []
    readings = []
    for zone in zones:
        try:
            readings.append(int(zone.read_text().strip()) / 1000)
        except (OSError, ValueError):
            continue
    if not readings:
        return []
    hottest = max(readings)
    data = {"celsius": hottest}
    if hottest >= TEMP_FAIL_C:
        return [Check(name="system.temperature", status=Status.FAIL,
                      message=Text("{celsius} °C: the CPU is throttling", celsius=f"{hottest:.0f}"),
                      fix=Text("give the box air: a case with ventilation or a heatsink/fan, away from heat sources"),
                      data=data)]
    if hottest >= TEMP_WARN_C:
        return [Check(name="system.temperature", status=Status.WARN, message=Text("{celsius} °C: running hot",
                                                                                  celsius=f"{hottest:.0f}"),
                      fix=Text("improve ventilation around the box"), data=data)]
    return [Check(name="system.temperature", status=Status.OK, message=Text("{celsius} °C", celsius=f"{hottest:.0f}"),
                  data=data)]


def _throttling(paths: SystemPaths) -> list[Check]:
    try:
        raw = paths.throttled.read_text().strip()
    except OSError:
        return []
    try:
        bits = int(raw, 16) if raw.startswith("0x") else int(raw)
    except ValueError:
        return []
    flags = [text for bit, text in _THROTTLE_BITS.items() if bits & (1 << bit)]
    data = {"raw": raw, "flags": flags}
    if bits & 0xF:
        return [Check(name="system.power", status=Status.FAIL, message=join("; ", flags), data=data,
                      fix=Text("use the official power supply (5 V 3 A for a Pi 4, 5 V 5 A for a Pi 5) "
                               "and a short cable"))]
    if bits:
        return [Check(name="system.power", status=Status.WARN, message=join("; ", flags), data=data,
                      fix=Text("the power supply dipped since boot: use the official power supply"))]
    return [Check(name="system.power", status=Status.OK, message=Text("no under-voltage or throttling"), data=data)]


def _collect(state_dir: Path, paths: SystemPaths, now: float) -> list[Check]:
    return [_disk(state_dir), *_fs_errors(paths), _clock(paths, now), *_temperature(paths), *_throttling(paths)]


async def system_checks(state_dir: Path, paths: SystemPaths | None = None) -> list[Check]:
    """Every machine check, read in a worker thread."""
    return await trio.to_thread.run_sync(_collect, state_dir, paths or SystemPaths(), time.time())



"""Helpers of the firmware update tests: a development key pair, signed bundles made by the
real ``rauc bundle``, and a stand-in for the ``rauc`` client whose ``info`` is the real one.

The default suite cannot let RAUC write real slots or a bootloader's variables (that is
``scripts/test-image``, under qemu). The stand-in runs the real ``rauc info`` (so the
signature check is RAUC's own) and records ``install`` and ``status mark-*`` in a log file
instead of writing a slot; a file ``fail-install`` beside it makes ``install`` fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

from appliance.devkit.cloud import SimHandle
from appliance.services.pairing import pair_from_web
from appliance.services.runtime import Runtime
from tests.sync_helpers import StartBox, StartSim, fast_cloud, wait_until

__all__ = ["Box", "FakeRauc", "KeyPair", "far_window", "last_update_reported", "make_bundle", "make_keys",
           "needs_rauc", "start"]

RAUC = shutil.which("rauc")
needs_rauc = pytest.mark.skipif(RAUC is None, reason="Debian's rauc is not installed (scripts/setup --test as root)")

FAKE = """#!{python}
import hashlib, os, subprocess, sys
here = os.path.dirname(os.path.abspath(__file__))
args = sys.argv[1:]
if args[:1] == ["info"]:
    sys.exit(subprocess.run([{rauc!r}, *args]).returncode)
with open(os.path.join(here, "rauc.log"), "a") as log:
    if args[:1] == ["install"]:
        if os.path.exists(os.path.join(here, "fail-install")):
            print("Installation error: Failed writing slot rootfs.1", file=sys.stderr)
            sys.exit(1)
        digest = hashlib.sha256(open(args[1], "rb").read()).hexdigest()
        log.write(f"install {{digest}}\\n")
    elif args[:1] == ["status"]:
        log.write(" ".join(args[1:]) + "\\n")
    else:
        print(f"unknown command {{args}}", file=sys.stderr)
        sys.exit(2)
"""


@attrs.frozen
class KeyPair:
    cert: Path
    key: Path


def make_keys(where: Path, name: str) -> KeyPair:
    where.mkdir(parents=True, exist_ok=True)
    pair = KeyPair(cert=where / f"{name}.cert.pem", key=where / f"{name}.key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(pair.key),
                    "-out", str(pair.cert), "-days", "3650", "-subj", f"/O=Store appliance/CN={name}"],
                   check=True, capture_output=True)
    return pair


def make_bundle(where: Path, version: str, keys: KeyPair, *, compatible: str = "store-appliance-test") -> Path:
    """A signed verity bundle of a small stand-in root image (real ``rauc bundle``)."""
    assert RAUC is not None
    content = where / f"content-{version}"
    content.mkdir(parents=True)
    (content / "root.ext4").write_bytes(os.urandom(64 * 1024))  # incompressible: squashfs needs > 4 KiB
    (content / "manifest.raucm").write_text(
        f"[update]\ncompatible={compatible}\nversion={version}\n\n[bundle]\nformat=verity\n\n"
        "[image.rootfs]\nfilename=root.ext4\n")
    bundle = where / f"appliance-{version}.raucb"
    subprocess.run([RAUC, "bundle", f"--cert={keys.cert}", f"--key={keys.key}", str(content), str(bundle)],
                   check=True, capture_output=True)
    return bundle


@attrs.frozen
class FakeRauc:
    path: Path

    @classmethod
    def make(cls, where: Path) -> FakeRauc:
        assert RAUC is not None
        where.mkdir(parents=True, exist_ok=True)
        path = where / "rauc"
        path.write_text(FAKE.format(python=sys.executable, rauc=RAUC))
        path.chmod(0o755)
        return cls(path)

    @property
    def calls(self) -> list[str]:
        log = self.path.parent / "rauc.log"
        return log.read_text().splitlines() if log.exists() else []

    def fail_installs(self) -> None:
        (self.path.parent / "fail-install").touch()


class Box:
    """The kernel's view of the slots, the stand-in rauc, and the box's [update] section."""

    def __init__(self, tmp: Path, keys: KeyPair) -> None:
        self.cmdline, self.boot_id = tmp / "cmdline", tmp / "boot_id"
        self.rauc = FakeRauc.make(tmp / "rauc-bin")
        self.keys = keys
        self.boots = 0

    def boot(self, slot: str) -> None:
        self.boots += 1
        self.cmdline.write_text(f"root=LABEL=root-{slot} rauc.slot={slot}\n")
        self.boot_id.write_text(f"boot-{self.boots}\n")

    def update(self, **extra: Any) -> dict[str, Any]:
        return {"window": "00:00-00:00", "keyring": str(self.keys.cert), "check_interval_s": 0.05,
                "retry_initial_s": 0.2, "retry_max_s": 0.5,
                "testing": {"rauc": str(self.rauc.path), "cmdline": str(self.cmdline),
                            "boot_id": str(self.boot_id)}, **extra}


async def start(start_sim: StartSim, start_box: StartBox, box: Box, sim: SimHandle | None = None,
                **update: Any) -> tuple[SimHandle, Runtime]:
    handle = sim or await start_sim()
    runtime = await start_box(cloud=fast_cloud(handle), media={"enabled": False}, update=box.update(**update))
    await pair_from_web(runtime, handle.pair_code)
    return handle, runtime


async def heartbeats_after_now(sim: SimHandle, count: int = 2) -> None:
    """Wait until ``count`` more heartbeats have reached the simulator: the first is answered
    with what the platform holds now (an offer just made), the next comes a whole interval
    after the box had that answer. What the box did not do by then, it did not do for it."""
    def newer_than(last: object) -> Callable[[], bool]:
        return lambda: bool(sim.state.heartbeats) and sim.state.heartbeats[-1] is not last

    for _ in range(count):
        await wait_until(newer_than(sim.state.heartbeats[-1] if sim.state.heartbeats else None), timeout_s=30,
                         what="one more heartbeat")


def last_update_reported(sim: SimHandle) -> dict[str, Any] | None:
    if not sim.state.heartbeats:
        return None
    report: dict[str, Any] = sim.state.heartbeats[-1]["body"]["update"]
    return report


def far_window() -> str:
    """A window of one minute, twelve hours away whatever the time now. (Both ends from the
    clock: at minute 59 the end is in the next hour, not at minute 0 of the same one, which
    would make a window of 23 hours that holds the time now.)"""
    start_at, end_at = (time.localtime(time.time() + 12 * 3600 + s) for s in (0, 60))
    return f"{start_at.tm_hour:02d}:{start_at.tm_min:02d}-{end_at.tm_hour:02d}:{end_at.tm_min:02d}"

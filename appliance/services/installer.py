"""The one place the appliance talks to the installer: RAUC, from Debian (docs/updates.md).

RAUC writes a signed bundle into the slot not running, makes it the bootloader's next
one-time choice, and marks the booted slot good or bad. This module runs its command-line
client (which talks to the root ``rauc`` service over D-Bus for install and marking; its
``info`` verifies a bundle's signature by itself, with no service):

- :meth:`Rauc.info`: the bundle's signature checked against the keyring, its manifest read
  (compatible, version). Nothing is written anywhere.
- :meth:`Rauc.install`: write the bundle into the inactive slot and select it for the next
  boot (RAUC checks the signature again, and the compatible string against its
  ``system.conf``).
- :meth:`Rauc.mark`: ``rauc status mark-good|mark-bad booted``.
- :func:`booted_slot`: the slot the bootloader booted, from ``rauc.slot=`` on the kernel
  command line (GRUB and the Pi's ``cmdline.txt`` of each slot set it).

Every call has a deadline at the call site of its caller; a command that fails raises
:class:`InstallerError` with RAUC's own words. Cancellation kills the command.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import attrs
import trio

__all__ = ["BundleInfo", "InstallerError", "Rauc", "booted_slot"]

# RAUC's messages are a few lines; its JSON a few KiB. Keep what a person needs to read.
OUTPUT_MAX: Final = 64 * 1024
_SLOT_ARG: Final = re.compile(r"(?:^|\s)rauc\.slot=(\S+)")


class InstallerError(Exception):
    """RAUC refused or failed (the message is RAUC's own last lines)."""


@attrs.frozen(kw_only=True)
class BundleInfo:
    compatible: str
    version: str


def booted_slot(cmdline: str) -> str:
    """The ``rauc.slot=`` of a kernel command line ("" when there is none: no A/B layout)."""
    match = _SLOT_ARG.search(cmdline)
    return match[1] if match else ""


def _words(proc: subprocess.CompletedProcess[bytes]) -> str:
    text = (proc.stderr or b"").decode("utf-8", "replace")[-OUTPUT_MAX:]
    # RAUC's own progress lines ("rauc-Message: ...") are not the reason it failed.
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and "Reading bundle" not in line and "rauc-Message" not in line]
    return " / ".join(lines[-3:]) or f"exit status {proc.returncode}"


@attrs.frozen(kw_only=True)
class Rauc:
    """RAUC's client. ``binary``: the ``rauc`` executable; ``keyring``: the certificate(s)
    a bundle's signature must chain to."""

    binary: str = "rauc"
    keyring: str = "/etc/rauc/keyring.pem"

    async def _run(self, args: Sequence[str]) -> subprocess.CompletedProcess[bytes]:
        try:
            proc = await trio.run_process([self.binary, *args], capture_stdout=True, capture_stderr=True,
                                          check=False)
        except OSError as exc:
            raise InstallerError(f"cannot run {self.binary}: {exc.strerror or exc}") from exc
        if proc.returncode != 0:
            raise InstallerError(_words(proc))
        return proc

    async def info(self, bundle: Path) -> BundleInfo:
        """Verify ``bundle``'s signature and read its manifest (writes nothing)."""
        proc = await self._run(["info", f"--keyring={self.keyring}", "--output-format=json", str(bundle)])
        try:
            manifest = json.loads(proc.stdout[:OUTPUT_MAX])
        except ValueError as exc:
            raise InstallerError(f"rauc info printed no JSON: {exc}") from exc
        compatible, version = manifest.get("compatible"), manifest.get("version")
        if not isinstance(compatible, str) or not isinstance(version, str):
            raise InstallerError("the bundle's manifest names no compatible or no version")
        return BundleInfo(compatible=compatible, version=version)

    async def install(self, bundle: Path) -> None:
        """Write ``bundle`` into the inactive slot and make it the next boot's (on trial)."""
        await self._run(["install", str(bundle)])

    async def mark(self, state: str) -> None:
        """Mark the booted slot ``good`` (keep it) or ``bad`` (the next boot goes back)."""
        if state not in ("good", "bad"):
            raise ValueError(f"mark what? {state!r}")
        await self._run(["status", f"mark-{state}", "booted"])

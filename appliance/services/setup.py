"""The boot partition's setup file, seen from the running box: the ``setup`` health checks.

``appliance setup apply`` (at boot, as root, before this process) records what it did in
the state directory (``appliance/setupfile.py``); the pairing service uses the code it
handed over (``services/pairing.py``). These checks say both in words, so a broken setup
file shows on the homepage, in ``/health`` and in ``appliance health`` with its fix.
"""

from __future__ import annotations

import time
from pathlib import Path

import trio

from appliance.protocol.health import Check, Status
from appliance.setupfile import SETUP_FILE, Handoff, SetupStatus, read_status

__all__ = ["setup_checks"]

_EDIT: str = (f"correct {SETUP_FILE} on the card's boot partition (any computer opens it; put the card back), "
              "then restart the box")


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def _file_check(status: SetupStatus | None) -> Check:
    name = "setup.file"
    if status is None or (status.state == "absent" and not status.applied_at):
        return Check(name=name, status=Status.OK, message=f"no {SETUP_FILE} on the boot partition (it is optional)")
    data = {"state": status.state, "file": status.file, "applied": list(status.applied),
            "applied_at": status.applied_at or None, "errors": list(status.errors)}
    last = (f"; last applied {_when(status.applied_at)}: {'; '.join(status.applied) or 'nothing to change'}"
            if status.applied_at else "")
    if status.state == "applied":
        removed = f"; removed from the file: {', '.join(status.scrubbed)}" if status.scrubbed else ""
        return Check(name=name, status=Status.OK, data=data,
                     message=f"{SETUP_FILE} applied {_when(status.applied_at)}: "
                             f"{'; '.join(status.applied) or 'nothing to change'}{removed}")
    if status.state == "unchanged":
        return Check(name=name, status=Status.OK, data=data, message=f"{SETUP_FILE} unchanged{last}")
    if status.state == "absent":
        return Check(name=name, status=Status.OK, data=data, message=f"no {SETUP_FILE} on the boot partition now{last}")
    if status.state == "invalid":
        return Check(name=name, status=Status.FAIL, data=data, fix=_EDIT,
                     message=f"{SETUP_FILE} was not applied, the box keeps its previous settings: "
                             + "; ".join(status.errors))
    return Check(name=name, status=Status.FAIL, data=data,
                 message=f"{SETUP_FILE} could not be applied, the box keeps its previous settings: "
                         + "; ".join(status.errors),
                 fix="restart the box; if this stays, the card may be failing: call support")


def _pairing_check(handoff: Handoff | None) -> list[Check]:
    name = "setup.pairing"
    if handoff is None:
        return []
    if handoff.code and handoff.problem:
        return [Check(name=name, status=Status.WARN, message=handoff.problem,
                      fix="check the network and the proxy (the wan checks say which step fails); "
                          "the box keeps trying")]
    if handoff.code:
        return [Check(name=name, status=Status.WARN, message="pairing with the code from the setup file",
                      fix="wait a minute; the wan checks say if the platform cannot be reached")]
    if handoff.problem:
        return [Check(name=name, status=Status.FAIL, message=handoff.problem,
                      fix=f"ask the back office for a new pairing code and pair on this page, "
                          f"or put it in {SETUP_FILE}")]
    return []


def _read(state_dir: Path) -> list[Check]:
    return [_file_check(read_status(state_dir)), *_pairing_check(Handoff.read(state_dir))]


async def setup_checks(state_dir: Path) -> list[Check]:
    return await trio.to_thread.run_sync(_read, state_dir)

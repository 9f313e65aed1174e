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
from appliance.protocol.text import Text
from appliance.setupfile import SETUP_FILE, Handoff, SetupStatus, read_status

__all__ = ["setup_checks"]

_EDIT: str = Text("correct {file} on the card's boot partition (any computer opens it; put the card back), "
                   "then restart the box", file=SETUP_FILE)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def _file_check(status: SetupStatus | None) -> Check:
    name = "setup.file"
    if status is None or (status.state == "absent" and not status.applied_at):
        return Check(name=name, status=Status.OK,
                     message=Text("no {file} on the boot partition (it is optional)", file=SETUP_FILE))
    data = {"state": status.state, "file": status.file, "applied": list(status.applied),
            "applied_at": status.applied_at or None, "errors": list(status.errors)}
    applied = "; ".join(status.applied) or Text("nothing to change")
    if status.state == "applied":
        message = Text("{file} applied {when}: {applied}", file=SETUP_FILE, when=_when(status.applied_at),
                       applied=applied)
        if status.scrubbed:
            message = Text("{message}; removed from the file: {keys}", message=message,
                           keys=", ".join(status.scrubbed))
        return Check(name=name, status=Status.OK, data=data, message=message)
    if status.state in ("unchanged", "absent"):
        message = (Text("{file} unchanged", file=SETUP_FILE) if status.state == "unchanged" else
                   Text("no {file} on the boot partition now", file=SETUP_FILE))
        if status.applied_at:
            message = Text("{message}; last applied {when}: {applied}", message=message,
                           when=_when(status.applied_at), applied=applied)
        return Check(name=name, status=Status.OK, data=data, message=message)
    if status.state == "invalid":
        return Check(name=name, status=Status.FAIL, data=data, fix=_EDIT,
                     message=Text("{file} was not applied, the box keeps its previous settings: {errors}",
                                  file=SETUP_FILE, errors="; ".join(status.errors)))
    return Check(name=name, status=Status.FAIL, data=data,
                 message=Text("{file} could not be applied, the box keeps its previous settings: {errors}",
                              file=SETUP_FILE, errors="; ".join(status.errors)),
                 fix=Text("restart the box; if this stays, the card may be failing: call support"))


def _pairing_check(handoff: Handoff | None) -> list[Check]:
    name = "setup.pairing"
    if handoff is None:
        return []
    if handoff.code and handoff.problem:
        return [Check(name=name, status=Status.WARN, message=handoff.problem,
                      fix=Text("check the network and the proxy (the wan checks say which step fails); "
                               "the box keeps trying"))]
    if handoff.code:
        return [Check(name=name, status=Status.WARN, message=Text("pairing with the code from the setup file"),
                      fix=Text("wait a minute; the wan checks say if the platform cannot be reached"))]
    if handoff.problem:
        return [Check(name=name, status=Status.FAIL, message=handoff.problem,
                      fix=Text("ask the back office for a new pairing code and pair on this page, "
                               "or put it in {file}", file=SETUP_FILE))]
    return []


def _read(state_dir: Path) -> list[Check]:
    return [_file_check(read_status(state_dir)), *_pairing_check(Handoff.read(state_dir))]


async def setup_checks(state_dir: Path) -> list[Check]:
    return await trio.to_thread.run_sync(_read, state_dir)

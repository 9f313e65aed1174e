"""A bundle on a USB stick or the boot partition, without a shell: the image's root helper
(``image/files/usr/local/lib/appliance/take-bundle``, run here as it is, on directories
standing for the mounted stick and the boot partition) copies it into the appliance's
inbox; the appliance checks its signature with the real ``rauc info``, installs it (the
stand-in ``rauc`` of ``tests/firmware_helpers.py`` records the install) and reports it.
Each bundle is taken once. What udev and the mount do is for ``scripts/test-image``."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from appliance import __version__
from appliance.protocol.firmware import OutcomeKind
from appliance.services.firmware import files_of
from appliance.services.i18n import gettext_for
from appliance.services.runtime import Runtime
from appliance.services.ticket import ticket_text
from tests.firmware_helpers import Box, far_window, last_update_reported, needs_rauc, start
from tests.sync_helpers import StartBox, StartSim, api_client, wait_until

pytest_plugins = ["tests.sync_fixtures", "tests.firmware_fixtures"]

pytestmark = needs_rauc

TAKE = Path(__file__).resolve().parents[1] / "image/files/usr/local/lib/appliance/take-bundle"


def take(source: str, where: Path, state: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(TAKE), source, str(where)], capture_output=True, text=True, timeout=60,
                          check=False, env={**os.environ, "APPLIANCE_STATE": str(state), **env})


def inbox(state: Path, source: str) -> list[str]:
    where = state / "update" / "inbox" / source
    return sorted(p.name for p in where.iterdir()) if where.is_dir() else []


def put(where: Path, bundle: Path, name: str = "", *, age_s: float = 0) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    path = where / (name or bundle.name)
    shutil.copyfile(bundle, path)
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_a_sticks_newest_bundle_is_copied_once_and_remembered(tmp_path: Path, signed: dict[str, Any]) -> None:
    stick, state = tmp_path / "stick", tmp_path / "state"
    state.mkdir()
    put(stick, signed["good"], age_s=3600)
    put(stick, signed["next"])
    done = take("usb", stick, state)
    assert done.returncode == 0, done.stderr
    assert inbox(state, "usb") == ["appliance-0.9.2.raucb"], "the newest, whole, under its name"
    assert (state / "update/inbox/usb/appliance-0.9.2.raucb").read_bytes() == signed["next"].read_bytes()
    assert sorted(p.name for p in stick.iterdir()) == ["appliance-0.9.0.raucb", "appliance-0.9.2.raucb"], \
        "a stick is read-only: nothing on it changes"
    (state / "update/inbox/usb/appliance-0.9.2.raucb").unlink()  # the appliance took it
    again = take("usb", stick, state)
    assert again.returncode == 0 and "taken before; not again" in again.stdout
    assert inbox(state, "usb") == []


def test_the_boot_partitions_bundle_is_renamed_once_taken(tmp_path: Path, signed: dict[str, Any]) -> None:
    boot, state = tmp_path / "boot", tmp_path / "state"
    state.mkdir()
    put(boot, signed["good"])
    assert take("boot", boot, state).returncode == 0
    assert inbox(state, "boot") == ["appliance-0.9.0.raucb"]
    assert sorted(p.name for p in boot.iterdir()) == ["appliance-0.9.0.raucb.taken"]
    again = take("boot", boot, state)
    assert again.returncode == 0 and "no firmware bundle" in again.stdout


def test_without_room_a_note_says_why_and_no_bundle_is_left(tmp_path: Path, signed: dict[str, Any]) -> None:
    boot, state = tmp_path / "boot", tmp_path / "state"
    state.mkdir()
    put(boot, signed["good"])
    assert take("boot", boot, state, APPLIANCE_MARGIN_KIB=str(2**40)).returncode == 0
    assert inbox(state, "boot") == ["appliance-0.9.0.raucb.refused"]
    assert "not enough room" in (state / "update/inbox/boot/appliance-0.9.0.raucb.refused").read_text()
    assert sorted(p.name for p in boot.iterdir()) == ["appliance-0.9.0.raucb.refused"]


async def run_take(source: str, where: Path, runtime: Runtime) -> str:
    done = await trio.run_process(["sh", str(TAKE), source, str(where)], capture_stdout=True, capture_stderr=True,
                                  env={**os.environ, "APPLIANCE_STATE": runtime.config.storage.dir})
    return done.stdout.decode()


async def test_a_sticks_bundle_is_installed_at_once_reported_and_not_taken_again(
        start_sim: StartSim, start_box: StartBox, box: Box, signed: dict[str, Any], tmp_path: Path) -> None:
    sim, runtime = await start(start_sim, start_box, box, window=far_window(), inbox_interval_s=0.05)
    files = files_of(runtime.config)
    stick = tmp_path / "stick"
    put(stick, signed["good"])
    assert "handed to the appliance" in await run_take("usb", stick, runtime)
    await wait_until(files.reboot.exists, timeout_s=20, what="the install and the reboot request")
    trial = files.read_trial()
    assert trial is not None and (trial.version, trial.source) == ("0.9.0", "usb")
    digest = hashlib.sha256(signed["good"].read_bytes()).hexdigest()
    assert box.rauc.calls == [f"install {digest}"], "now, although the window is twelve hours away"
    assert inbox(Path(runtime.config.storage.dir), "usb") == [] and list(files.local_dir.iterdir()) == []
    await wait_until(lambda: ((last_update_reported(sim) or {}).get("trial") or {}).get("source") == "usb",
                     what="the heartbeat telling the stick's install")
    # The stick left in (or plugged in again, or the next boot): not taken again.
    assert "taken before" in await run_take("usb", stick, runtime)
    await trio.sleep(0.3)
    assert box.rauc.calls == [f"install {digest}"]


async def test_a_strangers_bundle_on_the_boot_partition_is_refused_and_shown(
        start_sim: StartSim, start_box: StartBox, box: Box, signed: dict[str, Any], tmp_path: Path) -> None:
    sim, runtime = await start(start_sim, start_box, box, inbox_interval_s=0.05)
    boot = tmp_path / "boot"
    put(boot, signed["stranger"])
    await run_take("boot", boot, runtime)
    await wait_until(lambda: runtime.firmware.last is not None and not inbox(Path(runtime.config.storage.dir), "boot"),
                     what="the refusal")
    last = runtime.firmware.last
    assert last is not None and last.kind is OutcomeKind.REFUSED and last.source == "boot"
    assert "appliance-0.9.1.raucb" in last.reason and "signature does not check" in last.reason
    assert box.rauc.calls == []
    assert sorted(p.name for p in boot.iterdir()) == ["appliance-0.9.1.raucb.taken"]
    async with api_client(runtime, "admin") as admin:
        page = (await admin.get("/")).text
    assert "a bundle refused before anything was written" in page and "(from the boot partition)" in page
    ticket = ticket_text(runtime, gettext_for("en"))  # the status ticket says it too
    assert f"Firmware: {__version__}, slot A" in ticket
    assert "Last update: a bundle refused (from the boot partition)" in ticket
    assert "Dernière mise à jour : une mise à jour refusée (depuis la partition de démarrage)" \
        in ticket_text(runtime, gettext_for("fr"))
    await wait_until(lambda: ((last_update_reported(sim) or {}).get("last") or {}).get("source") == "boot",
                     what="the heartbeat reporting the refusal")


async def test_the_systems_note_that_it_could_not_take_a_bundle_is_shown(
        start_sim: StartSim, start_box: StartBox, box: Box, signed: dict[str, Any], tmp_path: Path) -> None:
    _, runtime = await start(start_sim, start_box, box, inbox_interval_s=0.05)
    stick = tmp_path / "stick"
    put(stick, signed["good"])
    await trio.run_process(["sh", str(TAKE), "usb", str(stick)], capture_stdout=True,
                           env={**os.environ, "APPLIANCE_STATE": runtime.config.storage.dir,
                                "APPLIANCE_MARGIN_KIB": str(2**40)})
    await wait_until(lambda: inbox(Path(runtime.config.storage.dir), "usb") == [], what="the note taken")
    last = runtime.firmware.last
    assert last is not None and last.kind is OutcomeKind.REFUSED and last.source == "usb"
    assert "not enough room" in last.reason and box.rauc.calls == []


@pytest.mark.parametrize("source", ["usb", "boot"])
def test_the_helper_refuses_an_unknown_source(tmp_path: Path, source: str) -> None:
    assert take(source + "x", tmp_path, tmp_path).returncode == 2

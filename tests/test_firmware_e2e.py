"""Firmware updates end to end in the default suite: a whole appliance and the cloud
simulator over real TLS on loopback, bundles signed by the real ``rauc bundle`` and checked
by the real ``rauc info``.

What the default suite cannot do is let RAUC write a slot, set the bootloader's one-time
choice and reboot: the ``rauc`` the box runs here is the stand-in of
``tests/firmware_helpers.py`` (its ``info`` is RAUC's own; ``install`` and ``mark-*`` are
recorded), the booted slot is a kernel command line in a file, and a "reboot" is the box
stopped and started again with the other slot's command line. ``scripts/test-image`` does
the real thing under qemu.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from appliance.devkit.cloud_faults import Fault
from appliance.protocol.firmware import OutcomeKind, Phase, TrialRecord
from appliance.protocol.health import Check, Status
from appliance.services.assembly import service_specs
from appliance.services.firmware import files_of
from appliance.services.pairing import pair_from_web
from appliance.storage import DATABASE_FILE, Database
from appliance.storage.events import enqueue
from appliance.supervisor import open_runtime, supervise_all
from tests.firmware_helpers import Box, far_window, heartbeats_after_now, last_update_reported, needs_rauc, start
from tests.sync_helpers import StartBox, StartSim, api_client, fast_cloud, wait_until

pytest_plugins = ["tests.sync_fixtures", "tests.firmware_fixtures"]

pytestmark = needs_rauc


async def test_an_offered_bundle_is_fetched_resumed_verified_installed_and_the_reboot_asked(
        start_sim: StartSim, start_box: StartBox, box: Box, signed: dict[str, Any]) -> None:
    sim = await start_sim()
    content = signed["good"].read_bytes()
    sim.state.faults.add(Fault(kind="cut", path="/blob/", after_bytes=len(content) // 3))
    offer = sim.state.offer_firmware("0.9.0", content)
    _, runtime = await start(start_sim, start_box, box, sim)
    files = files_of(runtime.config)
    await wait_until(files.reboot.exists, timeout_s=20, what="the reboot request")
    assert box.rauc.calls == [f"install {offer['sha256']}"], "RAUC got the verified bundle, once"
    ranges = [r for k, r in sim.state.blob_requests if k == "firmware/appliance-0.9.0.raucb"]
    assert ranges[0] == "" and ranges[1] == f"bytes={len(content) // 3}-", "the cut download resumed with Range"
    trial = files.read_trial()
    assert trial is not None and (trial.version, trial.from_slot, trial.to_slot) == ("0.9.0", "A", "B")
    assert trial.boot_id == "boot-1"
    assert runtime.firmware.phase is Phase.REBOOTING
    await wait_until(lambda: (last_update_reported(sim) or {}).get("phase") == "rebooting",
                     what="the heartbeat telling the install")


async def test_a_bundle_signed_by_another_key_is_refused_before_anything_is_written(
        start_sim: StartSim, start_box: StartBox, box: Box, signed: dict[str, Any]) -> None:
    sim = await start_sim()
    sim.state.offer_firmware("0.9.1", signed["stranger"].read_bytes())
    _, runtime = await start(start_sim, start_box, box, sim)
    await wait_until(lambda: runtime.firmware.last is not None, timeout_s=20, what="the refusal")
    last = runtime.firmware.last
    assert last is not None and last.kind is OutcomeKind.REFUSED and "signature verification failed" in last.reason
    assert box.rauc.calls == [], "RAUC was never asked to install"
    files = files_of(runtime.config)
    assert files.read_trial() is None and not files.reboot.exists() and not list(files.root.glob("*.raucb*"))
    await wait_until(lambda: ((last_update_reported(sim) or {}).get("last") or {}).get("outcome") == "refused",
                     what="the heartbeat reporting the refusal")
    sim.state.offer_firmware("0.9.1", signed["stranger"].read_bytes())  # offered again: not tried again
    await heartbeats_after_now(sim)
    assert box.rauc.calls == [] and runtime.firmware.phase is Phase.IDLE


async def test_bytes_that_do_not_match_the_offer_are_refused(start_sim: StartSim, start_box: StartBox, box: Box,
                                                              signed: dict[str, Any]) -> None:
    sim = await start_sim()
    sim.state.offer_firmware("0.9.0", signed["good"].read_bytes(), sha256="0" * 64)
    _, runtime = await start(start_sim, start_box, box, sim)
    await wait_until(lambda: runtime.firmware.last is not None, timeout_s=20, what="the refusal")
    assert runtime.firmware.last is not None and "do not match the offer's sha256" in runtime.firmware.last.reason
    assert box.rauc.calls == []


async def test_outside_the_window_the_bundle_waits_downloaded(start_sim: StartSim, start_box: StartBox, box: Box,
                                                               signed: dict[str, Any]) -> None:
    sim = await start_sim()
    offer = sim.state.offer_firmware("0.9.0", signed["good"].read_bytes())
    _, runtime = await start(start_sim, start_box, box, sim, window=far_window())
    await wait_until(lambda: runtime.firmware.phase is Phase.WAITING, timeout_s=20, what="waiting for the window")
    assert runtime.firmware.window_opens_in_s is not None and runtime.firmware.window_opens_in_s > 11 * 3600
    assert files_of(runtime.config).bundle(offer["sha256"]).is_file(), "downloaded and verified meanwhile"
    assert box.rauc.calls == []


async def test_a_failed_install_is_shown_and_tried_again(start_sim: StartSim, start_box: StartBox, box: Box,
                                                         signed: dict[str, Any]) -> None:
    box.rauc.fail_installs()
    sim = await start_sim()
    sim.state.offer_firmware("0.9.0", signed["good"].read_bytes())
    _, runtime = await start(start_sim, start_box, box, sim)
    await wait_until(lambda: runtime.firmware.phase is Phase.FAILED, timeout_s=20, what="the failure")
    assert "Failed writing slot" in runtime.firmware.error
    assert files_of(runtime.config).read_trial() is None
    (box.rauc.path.parent / "fail-install").unlink()
    await wait_until(files_of(runtime.config).reboot.exists, timeout_s=20, what="the retry's install")


def write_trial(runtime_config_dir: Path, box: Box, source: str = "platform") -> None:
    files_dir = runtime_config_dir / "update"
    files_dir.mkdir(parents=True, exist_ok=True)
    trial = TrialRecord(version="0.9.0", from_version="0.1.0", from_slot="A", to_slot="B", started_at=1.0,
                        boot_id=f"boot-{box.boots}", source=source)
    (files_dir / "trial.json").write_text(json.dumps(trial.as_dict()))


async def test_a_healthy_trial_is_marked_good_and_reported(start_sim: StartSim, start_box: StartBox, box: Box,
                                                           make_config: Any) -> None:
    write_trial(Path(make_config().storage.dir), box, source="usb")  # a technician's USB stick
    box.boot("B")
    sim, runtime = await start(start_sim, start_box, box)
    await wait_until(lambda: runtime.firmware.last is not None, timeout_s=20, what="the verdict")
    last = runtime.firmware.last
    assert last is not None and last.kind is OutcomeKind.COMMITTED and last.slot == "B" and last.source == "usb"
    assert box.rauc.calls == ["mark-good booted"]
    files = files_of(runtime.config)
    assert files.read_trial() is None and not files.snapshot.exists() and not files.reboot.exists()
    await wait_until(lambda: ((last_update_reported(sim) or {}).get("last") or {}).get("outcome") == "committed",
                     what="the heartbeat reporting the commit")
    assert (last_update_reported(sim) or {})["slot"] == "B"
    sim.state.offer_firmware("0.9.0", b"the same version, offered still")  # what runs now: nothing to do
    await heartbeats_after_now(sim)
    assert box.rauc.calls == ["mark-good booted"] and runtime.firmware.phase is Phase.IDLE


async def test_an_unhealthy_trial_goes_back_by_itself_and_the_old_slot_reports_it(
        start_sim: StartSim, start_box: StartBox, box: Box, make_config: Any) -> None:
    state_dir = Path(make_config().storage.dir)
    db = Database.open_sync(state_dir / DATABASE_FILE)  # the old slot's database, with a sale in it
    db.write_sync(lambda conn: enqueue(conn, id="sale-before", kind="sale", body="{}", now=1.0))
    db.close()
    write_trial(state_dir, box, source="upload")
    box.boot("B")
    sim = await start_sim()

    async def broken() -> list[Check]:  # what a broken build shows: a listener that does not answer
        return [Check(name="lan.listener.api", status=Status.FAIL, message="port 8000 does not accept connections")]

    config = make_config(cloud=fast_cloud(sim), media={"enabled": False}, update=box.update(trial_deadline_s=0.5))
    runtime = await open_runtime(config)
    runtime.health.add("broken", broken)  # before any service starts: the trial sees it first
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: supervise_all(runtime, service_specs(runtime),
                                                                  task_status=task_status))
            files = files_of(runtime.config)
            await wait_until(files.reboot.exists, timeout_s=20, what="the reboot back")
            runtime.stopping.set()
    finally:
        runtime.db.close()
    assert box.rauc.calls == ["mark-bad booted"]
    trial = files.read_trial()
    assert trial is not None and trial.verdict == "bad" and "port 8000" in trial.reason
    assert files.snapshot.is_file(), "the database was snapshotted before this slot opened it"

    box.boot("A")  # the bootloader's one-time choice is spent: the old slot boots
    files.reboot.unlink()
    again = await start_box(cloud=fast_cloud(sim), media={"enabled": False}, update=box.update())
    await pair_from_web(again, sim.pair_code)
    last = again.firmware.last
    assert last is not None and last.kind is OutcomeKind.ROLLED_BACK and last.slot == "A" and last.source == "upload"
    assert "port 8000" in last.reason
    assert files.read_trial() is None and not files.snapshot.exists()
    assert "database restored" in last.reason
    assert await again.db.read(lambda c: c.execute("SELECT id FROM events_outbox WHERE id = 'sale-before'")
                               .fetchone()) is not None, "the data is intact"
    await wait_until(lambda: ((last_update_reported(sim) or {}).get("last") or {}).get("outcome") == "rolled_back",
                     what="the heartbeat reporting the rollback")
    assert box.rauc.calls == ["mark-bad booted"], "the old slot installs nothing by itself"
    async with api_client(again, "admin") as client:
        page = (await client.get("/")).text
        status = (await client.get("/api/status")).json()
    assert "0.9.0 rolled back: the new firmware failed its trial" in page and "port 8000" in page
    assert status["update"]["last"]["outcome"] == "rolled_back" and status["update"]["slot"] == "A"


def run_cli(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_the_technicians_command_installs_a_file_and_refuses_a_strangers(tmp_path: Path, box: Box,
                                                                         signed: dict[str, Any]) -> None:
    state = tmp_path / "state"
    config = tmp_path / "appliance.toml"
    update = box.update()
    config.write_text(f'[storage]\ndir = "{state}"\n[update]\nkeyring = "{update["keyring"]}"\n'
                      f'[update.testing]\nrauc = "{update["testing"]["rauc"]}"\n'
                      f'cmdline = "{box.cmdline}"\nboot_id = "{box.boot_id}"\n')
    refused = run_cli("update", "install", str(signed["stranger"]), config=config)
    assert refused.returncode == 1 and "signature verification failed" in refused.stderr, refused.stderr
    assert box.rauc.calls == []
    wrong = run_cli("update", "install", str(signed["good"]), "--sha256", "0" * 64, config=config)
    assert wrong.returncode == 1 and "its sha256 is" in wrong.stderr
    done = run_cli("update", "install", str(signed["good"]), config=config)
    assert done.returncode == 0, done.stderr
    assert "installed 0.9.0 into slot B" in done.stdout
    assert box.rauc.calls == [f"install {hashlib.sha256(signed['good'].read_bytes()).hexdigest()}"]
    status = run_cli("update", "status", "--json", config=config)
    report = json.loads(status.stdout)
    assert report["slot"] == "A" and report["trial"]["to_slot"] == "B" and report["reboot_requested"] is True
    busy = run_cli("update", "install", str(signed["good"]), config=config)
    assert busy.returncode == 2 and "a trial is under way" in busy.stderr
    text = run_cli("update", "status", config=config)
    assert "booted slot A" in text.stdout and "trial: 0.9.0 in slot B" in text.stdout

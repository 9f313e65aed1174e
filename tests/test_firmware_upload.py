"""A technician's bundle without a shell: uploaded on the homepage (or to ``POST
/api/firmware``), streamed to the data partition, its signature checked by the real
``rauc info``, then installed now or in the maintenance window, and reported.

As in ``tests/test_firmware_e2e.py``, bundles are made and signed by the real ``rauc
bundle``; the box runs the stand-in ``rauc`` of ``tests/firmware_helpers.py`` (``info`` is
RAUC's own, ``install`` and ``mark-*`` are recorded: the suite cannot write slots), and the
booted slot is a kernel command line in a file. The first test runs the real ``appliance
run`` process over HTTP; the others a whole box in the test's loop.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import trio

from appliance.protocol.firmware import OutcomeKind, Phase, TrialRecord
from appliance.services.firmware import UpdateFiles, files_of
from appliance.services.runtime import Runtime
from appliance.services.web.firmware import API_PATH, FORM_PATH
from tests.firmware_helpers import Box, far_window, last_update_reported, needs_rauc, start
from tests.realbox import BoxProcess
from tests.sync_helpers import ADMIN, StartBox, StartSim, api_client, wait_until
from tests.test_sync_crash import pair

pytest_plugins = ["tests.sync_fixtures", "tests.firmware_fixtures"]

pytestmark = needs_rauc

FORM = FORM_PATH
API = API_PATH


def left_on_disk(files: UpdateFiles) -> list[str]:
    """Bundles and partial uploads on the data partition."""
    return sorted([p.name for p in files.local_dir.iterdir()] + [p.name for p in files.root.glob("*.raucb*")])


def form(path: Path | bytes, *, token: str = ADMIN, when: str | None = None, name: str = "") -> dict[str, Any]:
    """httpx's arguments for the homepage's form (fields first, then the file, as a browser)."""
    data = {"token": token} if token else {}
    if when is not None:
        data["when"] = when
    content = path.read_bytes() if isinstance(path, Path) else path
    filename = name or (path.name if isinstance(path, Path) else "bundle.raucb")
    return {"data": data, "files": {"bundle": (filename, content, "application/octet-stream")}}


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def test_the_real_process_streams_an_upload_refuses_junk_and_installs_a_bundle_now(
        start_sim: StartSim, tmp_path: Path, box: Box, signed: dict[str, Any]) -> None:
    sim = await start_sim()
    update = box.update(window=far_window())
    testing = "".join(f'{k} = "{v}"\n' for k, v in update.pop("testing").items())
    settings = "[update]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in update.items())
    (tmp_path / "real").mkdir()
    proc = BoxProcess(tmp_path / "real", sim, cloud={"heartbeat_interval_s": 0.5},
                      settings=f"{settings}[update.testing]\n{testing}")
    files = UpdateFiles(root=proc.state / "update")
    try:
        await proc.start()
        await pair(proc, sim)
        assert proc.process is not None
        async with proc.client("admin") as admin:
            page = (await admin.get("/")).text
            assert f"action='{FORM}' enctype='multipart/form-data'" in page and "name=bundle" in page

            # 128 MiB that is no bundle: streamed to disk (the process's peak memory barely
            # moves), then refused by RAUC, and deleted.
            junk = 128 * 2**20
            before = vm_hwm_kib(proc.process.pid)

            async def pieces() -> AsyncIterator[bytes]:
                block = os.urandom(1 << 20)
                for _ in range(junk >> 20):
                    yield block

            answer = await admin.post(API, params={"when": "now", "name": "junk.raucb"}, content=pieces(),
                                      headers={"Content-Type": "application/octet-stream",
                                               "Content-Length": str(junk)}, timeout=120)
            grew_mib = (vm_hwm_kib(proc.process.pid) - before) / 1024
            assert answer.status_code == 400, answer.text
            assert "junk.raucb was refused before anything was written" in answer.json()["error"]
            assert grew_mib < 48, f"the process's peak memory grew by {grew_mib:.0f} MiB for a 128 MiB upload"
            print(f"a 128 MiB upload: peak memory of the process +{grew_mib:.1f} MiB")
            assert left_on_disk(files) == [] and box.rauc.calls == []

            # The homepage's form, "now" although the window is twelve hours away.
            answer = await admin.post(FORM, **form(signed["good"], when="now"))
            assert answer.status_code == 202, answer.text
            assert "Bundle accepted" in answer.text and "firmware 0.9.0" in answer.text
            await wait_until(files.reboot.exists, timeout_s=60, what="the reboot request")
            digest = hashlib.sha256(signed["good"].read_bytes()).hexdigest()
            assert box.rauc.calls == [f"install {digest}"]
            trial = TrialRecord.from_dict(json.loads(files.trial_path.read_text()))
            assert (trial.version, trial.to_slot, trial.source) == ("0.9.0", "B", "upload")
            assert left_on_disk(files) == [], "the bundle is deleted once tried"
            assert "restarting into the new firmware" in (await admin.get("/")).text

            def reported() -> bool:
                report = last_update_reported(sim) or {}
                return report.get("phase") == "rebooting" and (report.get("trial") or {}).get("source") == "upload"

            await wait_until(reported, timeout_s=30, what="the heartbeat telling the upload's install")
            last = (last_update_reported(sim) or {})["last"]
            assert last["outcome"] == "refused" and last["source"] == "upload", "the junk's refusal was reported"
    finally:
        await proc.stop()


async def test_a_bundle_signed_by_another_key_is_refused_with_plain_words_and_nothing_written(
        start_sim: StartSim, start_box: StartBox, box: Box, signed: dict[str, Any]) -> None:
    sim, runtime = await start(start_sim, start_box, box)
    files = files_of(runtime.config)
    async with api_client(runtime, "admin") as admin:
        answer = await admin.post(FORM, **form(signed["stranger"], when="now"))
        assert answer.status_code == 400
        assert "Nothing was installed" in answer.text
        assert "its signature does not check against this box&#x27;s keyring" in answer.text
        page = (await admin.get("/")).text
    assert "a bundle refused before anything was written" in page and "(uploaded from the homepage)" in page
    assert box.rauc.calls == [] and left_on_disk(files) == [] and files.read_trial() is None
    last = runtime.firmware.last
    assert last is not None and last.kind is OutcomeKind.REFUSED and last.source == "upload"
    assert "appliance-0.9.1.raucb" in last.reason and "signature verification failed" in last.reason
    await wait_until(lambda: ((last_update_reported(sim) or {}).get("last") or {}).get("source") == "upload",
                     what="the heartbeat reporting the refusal")


async def test_without_the_admin_token_nothing_is_read_or_written(
        start_sim: StartSim, start_box: StartBox, box: Box, signed: dict[str, Any]) -> None:
    _, runtime = await start(start_sim, start_box, box)
    files = files_of(runtime.config)
    async with api_client(runtime, "admin") as admin:
        for token in ("", "wrong-token-0123456789abcdef"):
            answer = await admin.post(FORM, **form(signed["good"], token=token, when="now"))
            assert answer.status_code == 401 and "nothing was uploaded" in answer.text
        answer = await admin.post(API, content=signed["good"].read_bytes(), params={"when": "now"},
                                  headers={"Authorization": "", "Content-Type": "application/octet-stream"})
        assert answer.status_code == 401
    assert box.rauc.calls == [] and left_on_disk(files) == [] and runtime.firmware.last is None
    assert runtime.firmware.local is None and runtime.firmware.phase is Phase.IDLE


async def test_too_large_is_refused_declared_or_not_and_nothing_is_left(
        start_sim: StartSim, start_box: StartBox, box: Box, signed: dict[str, Any]) -> None:
    _, runtime = await start(start_sim, start_box, box, upload_max_bytes=16 * 1024)
    files = files_of(runtime.config)
    content = signed["good"].read_bytes()
    assert len(content) > 16 * 1024
    async with api_client(runtime, "admin") as admin:
        answer = await admin.post(FORM, **form(signed["good"], when="now"))  # Content-Length says it
        assert answer.status_code == 413 and "larger than the largest bundle" in answer.text

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: found out on the way
            for i in range(0, len(content), 4096):
                yield content[i:i + 4096]

        answer = await admin.post(API, content=chunked(), headers={"Content-Type": "application/octet-stream"})
        assert answer.status_code == 413, answer.text
    assert box.rauc.calls == [] and left_on_disk(files) == [] and runtime.firmware.receiving == ""


async def cut_post(runtime: Runtime, path: str, headers: dict[str, str], body: bytes) -> None:
    """Send a request head and ``body`` on a raw connection; once the box is writing the
    upload to disk, close the connection (a client gone half-way); wait for the box to end it."""
    files = files_of(runtime.config)
    stream = await trio.open_tcp_stream("127.0.0.1", runtime.ports["admin"])
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    await stream.send_all(head.encode() + b"\r\n" + body)
    await wait_until(lambda: runtime.firmware.receiving != "" and left_on_disk(files) != [],
                     what="the upload being written")
    await stream.aclose()
    await wait_until(lambda: runtime.firmware.receiving == "", what="the upload to end")


async def test_an_upload_cut_short_leaves_nothing(start_sim: StartSim, start_box: StartBox, box: Box,
                                                  signed: dict[str, Any]) -> None:
    _, runtime = await start(start_sim, start_box, box)
    files = files_of(runtime.config)
    content = signed["good"].read_bytes()
    bearer = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/octet-stream"}
    # The connection closed half-way through the declared body.
    await cut_post(runtime, f"{API}?when=now", {**bearer, "Content-Length": str(len(content))},
                   content[:len(content) // 2])
    assert left_on_disk(files) == []
    request = httpx.Request("POST", "http://x" + FORM, **form(signed["good"], when="now"))
    body = request.read()
    await cut_post(runtime, FORM, {"Content-Type": request.headers["content-type"],
                                   "Content-Length": str(len(body))}, body[:len(body) // 2])
    assert left_on_disk(files) == []
    # A whole HTTP body whose form lacks its end: the file may be cut short.
    async with api_client(runtime, "admin") as admin:
        cut = body[:body.rindex(b"\r\n--")]
        answer = await admin.post(FORM, content=cut, headers={"Content-Type": request.headers["content-type"]})
    assert answer.status_code == 400 and "cut short" in answer.text
    assert box.rauc.calls == [] and left_on_disk(files) == [] and runtime.firmware.last is None


async def test_by_default_it_waits_for_the_window_and_a_later_bundle_now_replaces_it(
        start_sim: StartSim, start_box: StartBox, box: Box, signed: dict[str, Any]) -> None:
    _, runtime = await start(start_sim, start_box, box, window=far_window())
    files = files_of(runtime.config)
    async with api_client(runtime, "admin") as admin:
        answer = await admin.post(FORM, **form(signed["good"]))
        assert answer.status_code == 202 and "in the maintenance window" in answer.text
        await wait_until(lambda: runtime.firmware.phase is Phase.WAITING, what="waiting for the window")
        page = (await admin.get("/")).text
        assert "0.9.0 (uploaded from the homepage): signature checked; installs in the maintenance window" in page
        status = (await admin.get("/api/status")).json()["update"]
        assert status["local"]["version"] == "0.9.0" and status["local"]["when"] == "window"
        assert box.rauc.calls == [] and files.read_local() is not None
        # A tool sends the next bundle, now: it replaces the one waiting and goes at once.
        answer = await admin.post(API, content=signed["next"].read_bytes(), params={"when": "now",
                                                                                     "name": "next.raucb"},
                                  headers={"Content-Type": "application/octet-stream"})
        assert answer.status_code == 202, answer.text
        assert answer.json()["version"] == "0.9.2" and answer.json()["when"] == "now"
    await wait_until(files.reboot.exists, timeout_s=20, what="the reboot request")
    assert box.rauc.calls == [f"install {hashlib.sha256(signed['next'].read_bytes()).hexdigest()}"]
    assert left_on_disk(files) == [] and runtime.firmware.local is None

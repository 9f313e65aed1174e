"""SIGKILL of the real process (``python -m appliance run``) in the middle of a download and
around a file's rename: after each restart no partial or wrong file is ever served, and in
the end every file is verified. The simulator runs in the test's loop, over TLS."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest
import trio

from appliance.devkit.cloud import SimHandle
from appliance.devkit.cloud_faults import Fault
from tests.realbox import BoxProcess
from tests.sync_helpers import ADMIN, StartSim, wait_until

pytest_plugins = ["tests.sync_fixtures"]

pytestmark = pytest.mark.slow

STORE = "store-0001"
VIDEO = "promotions/video-001.mp4"


# Media scanned often, with no rate limit or disk floor, so the crash lands mid-download.
MEDIA = """[media]
max_rate = 0
min_free_bytes = 0
scan_interval_s = 0.1
backoff_initial_s = 0.05
backoff_max_s = 0.3
[media.testing]
pause_at_rename_s = {pause_s}
"""


class Box(BoxProcess):
    """The box as its own process (admin and media on fixed ports), pausing ``pause_s`` at
    a file's rename (the start's choice)."""

    def __init__(self, tmp_path: Path, sim: SimHandle) -> None:
        super().__init__(tmp_path, sim, roles=("admin", "media"), settings=MEDIA.format(pause_s=0.0))

    async def start(self, *, settings: str | None = None, pause_s: float = 0.0) -> None:
        await super().start(settings=settings or MEDIA.format(pause_s=pause_s))

    def media(self) -> Path:
        return self.state / "media"

    def rows(self) -> set[str]:
        return {row[0] for row in self.query("SELECT sha256 FROM media_blobs")}


async def watch_served(box: Box, truth: dict[str, bytes], seen: list[int]) -> None:
    """Read every key again and again: the answer is 404 (not listed yet), 503 (not cached),
    a refused connection (the box is down) or exactly the true bytes. Never anything else."""
    async with httpx.AsyncClient(base_url=box.url("media"), trust_env=False,
                                 timeout=10.0) as client:
        while True:
            for key, content in truth.items():
                try:
                    answer = await client.get(f"/media/{key}")
                except httpx.TransportError:
                    continue
                assert answer.status_code in (200, 404, 503), answer.text
                if answer.status_code == 200:
                    assert hashlib.sha256(answer.content).digest() == hashlib.sha256(content).digest(), key
                    seen.append(len(content))
            await trio.sleep(0.05)


async def test_sigkill_mid_download_and_around_rename(start_sim: StartSim, tmp_path: Path,
                                                      nursery: trio.Nursery) -> None:
    sim = await start_sim(products=5, videos=1, video_bytes=4_000_000)
    sim.state.faults.add(Fault(kind="slow", path=f"/blob/{STORE}/{VIDEO}", bytes_per_s=1_000_000, count=1))
    video = b"".join(sim.state.blob_source(VIDEO).chunks(0, 4_000_000 - 1, 1 << 20))  # type: ignore[union-attr]
    sha = hashlib.sha256(video).hexdigest()
    truth = {f"products/SKU-{i:06d}.jpg": sim.state.blob(f"products/SKU-{i:06d}.jpg") or b"" for i in range(1, 6)}
    truth[VIDEO] = video
    box = Box(tmp_path, sim)
    served: list[int] = []
    try:
        # 1. Killed mid-download: the partial file is kept, never served.
        await box.start(pause_s=3.0)
        async with httpx.AsyncClient(base_url=box.url("admin"), trust_env=False,
                                     headers={"Authorization": f"Bearer {ADMIN}"}) as admin:
            assert (await admin.post("/api/pairing", json={"code": sim.pair_code})).status_code == 200
        nursery.start_soon(watch_served, box, truth, served)
        partial = box.media() / "partial" / sha
        await wait_until(lambda: partial.exists() and 500_000 < partial.stat().st_size < 4_000_000, 20.0,
                         "the video half downloaded")
        async with httpx.AsyncClient(base_url=box.url("admin"), trust_env=False,
                                     headers={"Authorization": f"Bearer {ADMIN}"}) as admin:
            # The homepage and /api/status show the fill's progress.
            media = (await admin.get("/api/status")).json()["media"]
            assert VIDEO in media["downloading"] and 0 < media["fill_done_bytes"] < media["fill_total_bytes"]
            assert "downloading" in (await admin.get("/")).text
        await box.kill()
        # 2. Restarted: the download resumes and completes; killed between its verification and its rename.
        await box.start(pause_s=3.0)
        await wait_until(lambda: partial.exists() and partial.stat().st_size == 4_000_000, 20.0, "the video complete")
        assert not (box.media() / "blobs" / sha).exists()
        await box.kill()
        # 3. Restarted: killed after the rename, before the database row.
        await box.start(pause_s=3.0)
        await wait_until((box.media() / "blobs" / sha).exists, 20.0, "the video renamed")
        assert sha not in box.rows()
        await box.kill()
        # 4. Restarted: the renamed file is hashed again and adopted; everything is served.
        await box.start(pause_s=0.0)
        await wait_until(lambda: sha in box.rows() and len(box.rows()) == 6, 20.0, "every file verified")
        await wait_until(lambda: 4_000_000 in served, 10.0, "the video served")
        for path in (box.media() / "blobs").iterdir():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
        assert not list((box.media() / "partial").iterdir())
        # The resume after the first kill asked for the rest only.
        ranges = [r for k, r in sim.state.blob_requests if k == VIDEO]
        assert ranges[0] == "" and ranges[1].startswith("bytes=") and len(ranges) == 2
        assert sim.state.blob_bytes_sent[VIDEO] < 1.1 * 4_000_000
    finally:
        await box.stop()

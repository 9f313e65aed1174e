"""The status homepage as a browser shows it: headless Chromium renders it from a real
appliance, with no JavaScript, and the page says what a technician needs to read."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from appliance.services.runtime import Runtime

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup --test)")


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    # The flags keep Chromium from calling home: only loopback is reached.
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-javascript", f"--user-data-dir={tmp_path / 'profile'}", *args],
        capture_output=True, text=True, timeout=90, check=False,
    )


async def test_homepage_renders_without_javascript(appliance: Runtime, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{appliance.ports['admin']}/"
    dom = await trio.to_thread.run_sync(lambda: chromium(tmp_path, "--dump-dom", url))
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "<h1>Store appliance</h1>" in html
    assert appliance.appliance_id in html
    for heading in ("Health", "Services", "Ports"):
        assert f"<h2>{heading}</h2>" in html
    assert f"{appliance.ports['discovery']}/udp" in html and "8081/tcp" in html
    shot = tmp_path / "home.png"  # kept by pytest under its basetemp for a person to look at
    result = await trio.to_thread.run_sync(
        lambda: chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,900", url))
    assert result.returncode == 0, result.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000  # a rendered page, not a blank

"""Debian's Chromium, headless, driven over the DevTools protocol (a WebSocket on loopback):
load a page at a window size, run a script in it, take a screenshot.

Used by the homepage tests: the page itself has no JavaScript, the test's checks do (the
overflow measure and axe-core). Chromium's flags keep it from calling home; it reaches
only the loopback URL it is given.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import websocket

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parents[1]
# axe-core from the npm registry, installed by scripts/setup --test when npm is there.
AXE = ROOT / ".venv" / "npm" / "node_modules" / "axe-core" / "axe.min.js"
# Screenshots kept for a person to look at (gitignored).
ARTEFACTS = ROOT / "test-artefacts"
START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 60.0

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio")


class Browser:
    """One page of a headless Chromium; close with :meth:`close` (or use :func:`chromium`)."""

    def __init__(self, ws: websocket.WebSocket) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def load(self, url: str, width: int, height: int, headers: dict[str, str] | None = None) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=width < 600)
        self.call("Network.enable")
        self.call("Network.setExtraHTTPHeaders", headers=headers or {})
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while self.evaluate("document.readyState") != "complete" or self.evaluate("location.href") != url:
            assert time.monotonic() < deadline, f"{url} did not load"
            time.sleep(0.1)  # a browser's state: polled

    def screenshot(self, path: Path, *, full_page: bool = True) -> bytes:
        """The whole page (or only the first screen, what a person sees without scrolling)."""
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png",
                                          captureBeyondViewport=full_page)["data"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return data

    def printed(self, path: Path) -> bytes:
        """The page as printed (A4, print styles), kept as a PDF; the page is left in
        print media so a script can measure it as printed."""
        self.call("Emulation.setEmulatedMedia", media="print")
        data = base64.b64decode(self.call("Page.printToPDF", paperWidth=8.27, paperHeight=11.69,
                                          printBackground=True)["data"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return data

    def close(self) -> None:
        self._ws.close()


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[Browser]:
    """A headless Chromium with one blank page; killed on exit."""
    assert CHROMIUM is not None
    profile.mkdir(parents=True, exist_ok=True)
    port_file = profile / "DevToolsActivePort"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen([CHROMIUM, *FLAGS, "--remote-debugging-port=0", "--remote-allow-origins=*",
                             f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, "chromium stopped at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)  # another process's file: polled
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=CALL_TIMEOUT_S, suppress_origin=True)
        browser = Browser(ws)
        try:
            yield browser
        finally:
            browser.close()
    finally:
        proc.kill()
        proc.wait()


# As printed: no control (a form that holds a table stays, its fields and buttons do not),
# black text, nothing wider than the page.
PRINTED_JS = """
(() => {
  const shown = [...document.querySelectorAll('button, input, select, textarea, label')]
    .filter((el) => el.getClientRects().length > 0).map((el) => el.outerHTML.slice(0, 80));
  return {shown: shown, colour: getComputedStyle(document.body).color,
          wide: document.documentElement.scrollWidth > document.documentElement.clientWidth};
})()
"""

# Every card (section) and the page itself: wider content than box means a sideways scroll.
OVERFLOW_JS = """
(() => {
  const out = [];
  const doc = document.documentElement;
  if (doc.scrollWidth > doc.clientWidth) out.push(`page: ${doc.scrollWidth} > ${doc.clientWidth}`);
  for (const el of document.querySelectorAll('section')) {
    if (el.scrollWidth > el.clientWidth) {
      const title = (el.querySelector('h2') || el).textContent.slice(0, 40);
      out.push(`${title}: ${el.scrollWidth} > ${el.clientWidth}`);
    }
  }
  return out;
})()
"""

AXE_RUN_JS = """
axe.run(document, {resultTypes: ['violations']}).then(r => r.violations.map(v => ({
  id: v.id, impact: v.impact, help: v.help,
  nodes: v.nodes.slice(0, 3).map(n => n.target.join(' ') + ': ' + n.failureSummary)})))
"""

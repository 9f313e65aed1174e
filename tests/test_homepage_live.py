"""The homepage follows the event stream in headless Chromium: with JavaScript, an order
placed through the store API appears on the open page without a reload; without it, the
page is complete and lists the latest events as of loading it."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.lowlevel
from trio_websocket import WebSocketConnection

from tests.event_clients import AUTH, TOKEN, BoxProcess, box_process, post_sales, ws_connect

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup --test)")

# The flags keep Chromium from calling home: only loopback is reached.
QUIET = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ORDER = {"id": "kiosk-4242", "device_id": "kiosk-7", "currency": "EUR", "total_cents": 700,
         "lines": [{"sku": "SKU-000001", "name": "Espresso", "qty": 2, "unit_price_cents": 350}]}


class DevTools:
    """Just enough of the Chrome DevTools Protocol: call a method, wait for its answer."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        await self.ws.send_message(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            answer = json.loads(await self.ws.get_message())
            if answer.get("id") == call_id:
                assert "error" not in answer, answer
                return answer["result"]  # type: ignore[no-any-return]

    async def value(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def until(self, expression: str) -> Any:
        with trio.fail_after(30):
            while True:  # the page's own state: nothing to wait on but polling
                if value := await self.value(expression):
                    return value
                await trio.sleep(0.1)


async def test_an_order_appears_on_the_open_page_without_a_reload(tmp_path: Path) -> None:
    assert CHROMIUM is not None
    with box_process(tmp_path) as box:
        profile = tmp_path / "profile"
        browser = await trio.lowlevel.open_process(
            [CHROMIUM, *QUIET, "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port_file = profile / "DevToolsActivePort"
            with trio.fail_after(60):
                while True:  # Chromium writes its debugging port there once it listens
                    if port_file.exists() and port_file.read_text().strip():
                        break
                    await trio.sleep(0.1)
            debug_port = int(port_file.read_text().splitlines()[0])
            async with httpx.AsyncClient(timeout=10) as client:
                targets = (await client.get(f"http://127.0.0.1:{debug_port}/json/list")).json()
            page = urllib.parse.urlsplit(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
            async with ws_connect(page.port or 80, page.path, message_queue_size=256) as ws:
                tools = DevTools(ws)
                await tools.call("Page.navigate", url=box.url("admin", f"/#token={TOKEN}"))
                assert await tools.until("document.getElementById('live-state').textContent == 'live'")
                await tools.value("window.stayed = 'the same page'")
                async with httpx.AsyncClient(timeout=10, headers=AUTH) as client:
                    answer = await client.post(box.url("api", "/v1/orders"), json=ORDER)
                    assert answer.status_code == 201, answer.text
                row = await tools.until(
                    "[...document.querySelectorAll('#live-events tr')].map(r => r.innerText)"
                    ".find(t => t.includes('id=kiosk-4242'))")
                assert "order.received" in row and "source=device" in row
                assert await tools.value("window.stayed") == "the same page"  # no reload happened
                # The kitchen screen's command for it shows up as well (commands topic).
                assert await tools.value("document.getElementById('live-events').rows.length") >= 2
        finally:
            browser.kill()
            await browser.wait()


async def test_without_javascript_the_page_is_complete(tmp_path: Path) -> None:
    assert CHROMIUM is not None
    with box_process(tmp_path) as box:
        await post_sales(box.url("api"), ["sale-before-load"])
        dom = await trio.to_thread.run_sync(lambda: subprocess.run(
            [CHROMIUM, *QUIET, "--disable-javascript", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
             box.url("admin", "/")], capture_output=True, text=True, timeout=90, check=False))
        assert dom.returncode == 0, dom.stderr[-2000:]
        page = dom.stdout
        for heading in ("Health checks", "Services", "Live events", "Ports"):
            assert f"<h2>{heading}</h2>" in page
        assert "id=sale-before-load" in page and "sale.received" in page
        assert "live updates need JavaScript" in page
        await _no_box_left(box)


async def _no_box_left(box: BoxProcess) -> None:
    assert box.proc.poll() is None  # still serving: the page did not break anything

"""The status homepage as a browser shows it: headless Chromium renders it from a real
appliance at a desktop size (1280x900) and a technician's phone (390x844). No card may
scroll sideways, axe-core finds no serious or critical accessibility violation, and the
screenshots are kept in test-artefacts/homepage/ for a person to look at; in English and in
French. Printed (A4, print styles), it shows no form and is black on white (kept as PDFs)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from appliance.services.i18n import LANGUAGES
from appliance.services.runtime import Runtime
from tests.browser import ARTEFACTS, AXE, AXE_RUN_JS, CHROMIUM, OVERFLOW_JS, PRINTED_JS, chromium
from tests.conftest import ConfigFactory, device_key, running_box
from tests.homepage import busy_config, fill

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup --test)")

SIZES = ((1280, 900), (390, 844))


@pytest.fixture
async def busy_box(make_config: ConfigFactory) -> AsyncIterator[Runtime]:
    """A box with what makes a homepage crowded: devices with long names that cannot be
    reached, a device waiting for adoption with its code, a cloud that does not answer, no
    pairing, an online order, remote support on, a firmware update waiting, media missing
    (tests/homepage.py)."""
    async with running_box(busy_config(make_config)) as runtime:
        await fill(runtime)
        yield runtime


async def test_homepage_reads_at_a_glance_without_sideways_scrolling_or_accessibility_faults(
        busy_box: Runtime, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{busy_box.ports['admin']}/"
    axe = AXE.read_text() if AXE.exists() else None
    await trio.sleep(1)  # the device links try once: their state is on the page

    def look() -> dict[str, object]:
        found: dict[str, object] = {}
        with chromium(tmp_path / "profile") as browser:
            for lang, (width, height) in itertools.product(LANGUAGES, SIZES):
                key = f"{lang} {width}"
                browser.load(url, width, height, headers={"Accept-Language": f"{lang};q=1"})
                found[f"png {key}"] = browser.screenshot(ARTEFACTS / "homepage" / f"home-{lang}-{width}x{height}.png")
                browser.screenshot(ARTEFACTS / "homepage" / f"home-{lang}-{width}x{height}-first-screen.png",
                                   full_page=False)
                found[f"overflow {key}"] = browser.evaluate(OVERFLOW_JS)
                found[f"headline {key}"] = browser.evaluate("document.querySelector('main > section').textContent")
                found[f"lang {key}"] = browser.evaluate("document.documentElement.lang")
                if axe is not None:
                    browser.evaluate(axe)
                    found[f"axe {key}"] = browser.evaluate(AXE_RUN_JS)
            for lang in LANGUAGES:  # readable printed: A4, no forms, black on white
                browser.load(url, 794, 1123, headers={"Accept-Language": f"{lang};q=1"})
                found[f"pdf {lang}"] = browser.printed(ARTEFACTS / "homepage" / f"home-{lang}-printed.pdf")
                found[f"printed {lang}"] = browser.evaluate(PRINTED_JS)
        return found

    found = await trio.to_thread.run_sync(look)
    first_words = {"en": ("The shop ", "First:"), "fr": ("La boutique ", "D'abord :")}
    for lang, (width, _) in itertools.product(LANGUAGES, SIZES):
        key = f"{lang} {width}"
        png = found[f"png {key}"]
        assert isinstance(png, bytes) and png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        assert found[f"overflow {key}"] == [], f"{key} px, these scroll sideways: {found[f'overflow {key}']}"
        headline = str(found[f"headline {key}"])
        start, first = first_words[lang]
        assert headline.startswith(start) and first in headline, headline
        assert found[f"lang {key}"] == lang
        if axe is None:
            continue
        violations = found[f"axe {key}"]
        assert isinstance(violations, list)
        bad = [v for v in violations if v["impact"] in ("serious", "critical")]
        assert bad == [], f"{key} px: {bad}"
    for lang in LANGUAGES:
        pdf = found[f"pdf {lang}"]
        assert isinstance(pdf, bytes) and pdf.startswith(b"%PDF") and len(pdf) > 10_000
        assert found[f"printed {lang}"] == {"shown": [], "colour": "rgb(0, 0, 0)", "wide": False}, lang
    if axe is None:
        pytest.skip("axe-core is not installed (scripts/setup --test installs it with npm): accessibility not checked")


async def test_homepage_order_headline_then_problems_then_the_rest(busy_box: Runtime) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=30) as client:
        html = (await client.get(f"http://127.0.0.1:{busy_box.ports['admin']}/")).text
    headline = html.index("role=status")
    problems = html.index("<h2>What is wrong, and how to fix it</h2>")
    services = html.index("<h2>Services</h2>")
    ports = html.index("<h2>Ports</h2>")
    assert headline < problems < services < ports
    assert "reach 3 of its 3 devices" in html
    assert f"{busy_box.ports.of('discovery')}/udp" in html and "8081/tcp" in html
    assert "@media print" in html  # readable printed: no forms, black on white


async def test_a_connected_device_is_seen_in_every_table(make_config: ConfigFactory) -> None:
    # Devices once said "last seen: never" for a device Device links showed connected, and
    # Services "dispatcher 0 device(s)" with devices connected.
    from functools import partial

    import httpx

    from appliance.devkit.device import DeviceSimulator, run_device_simulator

    async with trio.open_nursery() as nursery:
        sim = DeviceSimulator(device_id="kds-1", kind="kds", key=device_key("kds-1"))
        port = await nursery.start(partial(run_device_simulator, sim, port=0, bind="127.0.0.1"))
        devices = [{"id": "kds-1", "kind": "kds", "address": "127.0.0.1", "port": port, "name": "Kitchen",
                    "key": device_key("kds-1").hex()}]
        async with running_box(make_config(devices=devices)) as runtime, httpx.AsyncClient(timeout=30) as client:
            with trio.fail_after(20):
                # The link's status is a record the dispatcher updates, with no event to wait on.
                while not (link := runtime.device_links.links.get("kds-1")) or link.connected_since is None:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            html = (await client.get(f"http://127.0.0.1:{runtime.ports['admin']}/")).text
            french = (await client.get(f"http://127.0.0.1:{runtime.ports['admin']}/",
                                       headers={"Accept-Language": "fr"})).text
        nursery.cancel_scope.cancel()

    def section(page: str, title: str) -> str:
        start = page.index(f"<h2>{title}")
        return page[start:page.index("</section>", start)]

    devices_table = section(html, "Devices")
    assert "never" not in devices_table, devices_table
    assert "dispatcher" in html and "1 device(s)" in html
    # The same in French: one word per state in every section.
    assert ">adopted<" in devices_table and ">connected<" in section(html, "Device links")
    assert "jamais" not in section(french, "Appareils") and ">adopté<" in section(french, "Appareils")
    assert ">connecté<" in section(french, "Liaisons avec les appareils")
    assert "1 appareil(s)" in french

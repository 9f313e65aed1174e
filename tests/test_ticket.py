"""The status ticket reaches a simulated receipt printer over the device channel: on the
box's first start, and on the homepage's button; its text is in the printer's log."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import httpx
import trio

from appliance.devkit.device import Accepted, DeviceSimulator, read_log, run_device_simulator
from appliance.services.ticket import FIRST_BOOT_MARKER
from tests.conftest import ConfigFactory, device_key, running_box


async def _wait_for(log: Path, count: int) -> list[Accepted]:
    with trio.fail_after(30):
        while len(tickets := [c for c in read_log(log) if c.kind == "print"]) < count:  # noqa: ASYNC110
            await trio.sleep(0.05)  # another component's file: polled
    return tickets


async def test_status_ticket_on_first_start_and_on_the_homepage_button(
        make_config: ConfigFactory, tmp_path: Path) -> None:
    log = tmp_path / "printer.jsonl"
    printer = DeviceSimulator(device_id="printer-1", kind="printer", log_path=log, key=device_key("printer-1"))
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(run_device_simulator, printer, port=0, bind="127.0.0.1"))
            devices = [{"id": "printer-1", "kind": "printer", "address": "127.0.0.1", "port": port,
                        "key": device_key("printer-1").hex()}]
            config = make_config(devices=devices, admin={"token": "ticket-test-admin-token-0123", "language": "fr",
                                                                   "first_start_ticket": True})
            async with running_box(config) as runtime:
                [first] = await _wait_for(log, 1)
                text = first.body["text"]
                assert runtime.appliance_id in text
                assert f"http://127.0.0.1:{runtime.ports['admin']}/" in text
                assert "NON APPAIRÉ" in text and "code d'appairage" in text  # [admin] language = "fr"
                url = f"http://127.0.0.1:{runtime.ports['admin']}/ticket"
                async with httpx.AsyncClient(timeout=30) as client:
                    refused = await client.post(url, data={"token": "wrong"})
                    assert refused.status_code == 401
                    answer = await client.post(url, data={"token": "ticket-test-admin-token-0123"})
                    assert answer.status_code == 303
                    home = await client.get(f"http://127.0.0.1:{runtime.ports['admin']}/")
                    assert "Print a status ticket" in home.text
                await _wait_for(log, 2)
            assert (tmp_path / "state" / FIRST_BOOT_MARKER).exists()
            # A second start is not a first boot: no ticket unless asked.
            async with running_box(config):
                with trio.move_on_after(2):
                    await _wait_for(log, 3)
                assert len([c for c in read_log(log) if c.kind == "print"]) == 2
            nursery.cancel_scope.cancel()
    finally:
        printer.close()

"""The status ticket reaches a simulated receipt printer over the device channel: on the
box's first start, on the homepage's button, and on the printer's own button (that printer
only); its text is in the printer's log."""

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


async def test_a_printers_own_button_prints_the_ticket_on_that_printer(
        make_config: ConfigFactory, tmp_path: Path) -> None:
    # Two printers and a kitchen screen; the first printer's button is pressed: the ticket
    # reaches that printer only, once for a burst of presses (at most one every 30 s); the
    # screen's button asks too, and gets nothing (it has no paper).
    sims = {d: DeviceSimulator(device_id=d, kind=k, log_path=tmp_path / f"{d}.jsonl", key=device_key(d))
            for d, k in (("printer-1", "printer"), ("printer-2", "printer"), ("kds-1", "kds"))}
    try:
        async with trio.open_nursery() as nursery:
            devices = []
            for d, sim in sims.items():
                port = await nursery.start(partial(run_device_simulator, sim, port=0, bind="127.0.0.1"))
                devices.append({"id": d, "kind": sim.hello.kind, "address": "127.0.0.1", "port": port,
                                "key": device_key(d).hex()})
            config = make_config(devices=devices, admin={"language": "fr", "first_start_ticket": False})
            async with running_box(config) as runtime:
                with trio.fail_after(30):
                    while not all(s.connections for s in sims.values()):  # noqa: ASYNC110
                        await trio.sleep(0.05)
                for _ in range(3):
                    sims["printer-1"].press_button()
                sims["kds-1"].press_button()
                [ticket] = await _wait_for(tmp_path / "printer-1.jsonl", 1)
                assert ticket.body["purpose"] == "status-ticket"
                assert runtime.appliance_id in ticket.body["text"] and "NON APPAIRÉ" in ticket.body["text"]
                with trio.move_on_after(2):
                    await _wait_for(tmp_path / "printer-1.jsonl", 2)
                assert len([c for c in read_log(tmp_path / "printer-1.jsonl") if c.kind == "print"]) == 1
                assert read_log(tmp_path / "printer-2.jsonl") == [] and read_log(tmp_path / "kds-1.jsonl") == []
            nursery.cancel_scope.cancel()
    finally:
        for sim in sims.values():
            sim.close()

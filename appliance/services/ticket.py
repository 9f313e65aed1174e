"""The status ticket: a short printout on an adopted receipt printer, so a technician
standing at the till learns the box's name, address and homepage, and whether it is paired
(and, while it is not, how to pair it), with no screen and no laptop.

Printed through the device channel (a ``print`` command in the printer's outbox, so it
survives a restart and waits for a printer that is off): on the box's first start (once an
adopted printer exists; a marker file in the state directory remembers it was printed), and
on the homepage's "Print a status ticket" button, and when an adopted printer's own button
asks for it (a ``ticket`` message on the device channel, docs/device-channel.md): then on
that printer only, at most once every 30 s. In the language of ``[admin] language``.
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from typing import Final

import trio

from appliance.protocol.firmware import FirmwareStatus, OutcomeKind
from appliance.protocol.text import Text
from appliance.services.dispatcher import enqueue
from appliance.services.i18n import Gettext, gettext_for
from appliance.services.netif import interfaces
from appliance.services.runtime import Runtime
from appliance.storage.devices import list_adopted

__all__ = ["FIRST_BOOT_MARKER", "print_ticket", "run_first_boot_ticket", "ticket_text"]

log = logging.getLogger(__name__)

PRINT_KIND: Final = "print"
# A ticket that could not be printed within an hour says something stale: drop it.
TICKET_TTL_S: Final = 3600.0
FIRST_BOOT_MARKER: Final = "status-ticket.printed"
WIDTH: Final = 42  # characters on an 80 mm receipt at the usual font


def _addresses(runtime: Runtime) -> list[str]:
    bind = runtime.config.lan.bind
    if bind not in ("0.0.0.0", "::", ""):
        return [bind]
    try:
        found = [i.address for i in interfaces() if i.up and not i.loopback]
    except OSError:
        found = []
    return found or ["127.0.0.1"]


def ticket_text(runtime: Runtime, _: Gettext) -> str:
    """The ticket's lines (plain text, at most :data:`WIDTH` characters each where it can)."""
    port = runtime.ports.of("admin")
    suffix = "" if port == 80 else f":{port}"
    addresses = _addresses(runtime)
    store = runtime.store
    lines = ["=" * WIDTH, _("STORE APPLIANCE STATUS"), "=" * WIDTH,
             _("Box: {name}").format(name=runtime.appliance_id),
             _("Host name: {name}").format(name=socket.gethostname()),
             _("Address: {address}").format(address=", ".join(addresses)),
             _("Homepage: {url}").format(url=f"http://{addresses[0]}{suffix}/")]
    if store is None:
        lines += [_("Pairing: NOT PAIRED"),
                  _("To pair: open the homepage, enter the pairing code from the back office, then press Pair.")]
    elif store.needs_repair:
        lines += [_("Pairing: store {store}, REFUSED by the platform").format(store=store.store_id),
                  _("To pair again: enter a new pairing code on the homepage.")]
    else:
        lines.append(_("Pairing: paired with store {store}").format(store=store.store_id))
    lines += _firmware_lines(runtime.firmware, _)
    lines += ["-" * WIDTH, time.strftime("%Y-%m-%d %H:%M:%S %Z"), ""]
    return "\n".join(lines)


def _firmware_lines(fw: FirmwareStatus, _: Gettext) -> list[str]:
    """The firmware running and how the last update ended (a technician's bundle too)."""
    if not fw.version:
        return []
    lines = [_("Firmware: {version}, slot {slot}").format(version=fw.version, slot=fw.slot) if fw.slot
             else _("Firmware: {version}").format(version=fw.version)]
    if fw.last is not None:
        outcome = {OutcomeKind.COMMITTED: _("kept"), OutcomeKind.ROLLED_BACK: _("rolled back"),
                   OutcomeKind.REFUSED: _("refused"), OutcomeKind.FAILED: _("failed")}[fw.last.kind]
        source = {"upload": _("(uploaded from the homepage)"), "usb": _("(from a USB stick)"),
                  "boot": _("(from the boot partition)")}.get(fw.last.source, "")
        lines.append(_("Last update: {version} {outcome} {source}").format(
            version=fw.last.version or _("a bundle"), outcome=outcome, source=source).rstrip())
    return lines


async def print_ticket(runtime: Runtime, *, only: str | None = None) -> list[str]:
    """Queue the ticket for every adopted printer (or the one whose id is ``only``);
    returns their ids (empty: no such printer)."""
    printers = [d for d in await runtime.db.read(list_adopted) if d.kind == "printer" and only in (None, d.id)]
    text = ticket_text(runtime, gettext_for(runtime.config.admin.language))
    now = time.time()
    for printer in printers:
        await enqueue(runtime, printer.id, PRINT_KIND, {"text": text, "purpose": "status-ticket", "printed_at": now},
                      now + TICKET_TTL_S)
    return [p.id for p in printers]


async def run_first_boot_ticket(runtime: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                                ) -> None:
    """On the box's first start, print the ticket once a printer is adopted; meanwhile and
    then, print one on each printer whose own button asks for it, until the box stops."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_answer_buttons, runtime)
        task_status.started()
        await _first_start(runtime)


async def _answer_buttons(runtime: Runtime) -> None:
    seen = 0
    while True:
        seen = await runtime.ticket_requests.changes.wait(seen)
        for device_id in runtime.ticket_requests.take():
            if await print_ticket(runtime, only=device_id):
                log.info("status ticket queued for %s (its own button)", device_id)
            else:  # a display or a scanner has no paper: its button means something else
                log.info("device %s asked for a status ticket but is not an adopted printer", device_id)


async def _first_start(runtime: Runtime) -> None:
    marker = Path(runtime.config.storage.dir) / FIRST_BOOT_MARKER
    if runtime.config.admin.first_start_ticket and not marker.exists():
        runtime.board.say("ticket", Text("first start: waiting for an adopted receipt printer"))
        while True:
            seen = runtime.device_changes.version
            if await print_ticket(runtime):
                break
            await runtime.device_changes.wait(seen)
        await trio.to_thread.run_sync(marker.write_text, f"{time.time()}\n")
        log.info("status ticket queued for the printers (first start)")
    runtime.board.say("ticket", Text("first-start ticket queued for the printers; the homepage button or a "
                                     "printer's own button queues another"))
    await trio.sleep_forever()

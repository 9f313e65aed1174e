"""A box whose homepage has something in every section, for the tests that read the page
(tests/test_i18n.py: no English left in French; tests/test_homepage_browser.py: the
screenshots, the overflow and accessibility checks, in both languages).

Declared devices with long names that cannot be reached (their links back off); a device
found on the LAN waiting for adoption with its enrollment code; online orders on (not
paired: waiting) with one order routed to a device; remote support allowed; a firmware
update downloaded and waiting for its window, after one that rolled back; the media
cache part filled, part missing, one download failed."""

from __future__ import annotations

import json
import socket
import time
from functools import partial
from typing import Any

from appliance.config import Config
from appliance.protocol.firmware import Outcome, OutcomeKind, Phase
from appliance.protocol.media_cache import MediaStatus
from appliance.protocol.orders import parse_order
from appliance.protocol.sync import http_failure
from appliance.services.runtime import Runtime
from appliance.services.support_channel import switch_support
from appliance.storage.devices import new_pending
from appliance.storage.enrollments import Enrollment, offer
from appliance.storage.orders import record_order
from tests.conftest import ConfigFactory, device_key

__all__ = ["busy_config", "fill"]

LONG_NAME = "Kitchen display number {n} by the pass, second floor"


def busy_config(make_config: ConfigFactory, **extra: Any) -> Config:
    """Three declared devices whose ports nothing listens on, online orders on."""
    closed = []
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed.append(s.getsockname()[1])  # nothing listens there once closed
    devices = [{"id": (device_id := f"kitchen-screen-{n}-{'x' * 30}"), "kind": kind, "address": "127.0.0.1",
                "port": port, "name": LONG_NAME.format(n=n), "key": device_key(device_id).hex()}
               for n, (kind, port) in enumerate(zip(("kds", "printer", "pos"), closed, strict=True), 1)]
    return make_config(devices=devices, orders={"enabled": True}, **extra)


def _lan_device_and_order(conn: Any, *, order_to: str, now: float) -> None:
    new_pending(conn, device_id="pos-2", kind="pos", name="Caisse 2", address="192.0.2.20", port=8081, now=now)
    offer(conn, Enrollment(device_id="pos-3", kind="pos", name="Caisse 3", address="192.0.2.30", port=8081,
                           public_key="ab" * 32, commitment="cd" * 32, box_nonce="ef" * 16, device_nonce="01" * 16,
                           code="482913", created=now))
    body = {"order_id": "web-001234", "channel": "click_and_collect", "created_at": "2026-11-30T09:30:00Z",
            "customer": {"name": "Camille"}, "currency": "EUR", "total_cents": 123456,
            "lines": [{"sku": "SKU-000007", "name": "Croissant", "qty": 2, "unit_price_cents": 349}]}
    record_order(conn, message_id="m-1", order=parse_order(json.dumps(body).encode()), device_ids=[order_to],
                 at="2026-11-30T09:30:01.000Z", now=now)


async def fill(runtime: Runtime) -> None:
    """Put something in every section of ``runtime``'s homepage (see the module's words)."""
    now = time.time()
    first = sorted(runtime.device_links.links)[0] if runtime.device_links.links else "kitchen-screen-1"
    await runtime.db.write(partial(_lan_device_and_order, order_to=first, now=now))
    await switch_support(runtime, True)
    fw = runtime.firmware
    fw.phase, fw.window_opens_in_s = Phase.WAITING, 5400.0
    fw.last = Outcome(version="2026.11.2", kind=OutcomeKind.ROLLED_BACK, at=now - 86400,
                      reason="the new firmware did not pass its health checks")
    if runtime.media is not None:
        runtime.media.status = MediaStatus(
            files_wanted=1234, bytes_wanted=3_500_000_000, files_cached=1200, bytes_cached=2_450_000_000,
            files_missing=34, over_budget=20, failing=2, budget_bytes=2_500_000_000, fill_done_bytes=1_500_000,
            fill_total_bytes=9_000_000, downloading=["img/croissant.jpg"],
            last_error=http_failure("media.example", 503),
            last_error_key="img/pain-au-chocolat.jpg", last_error_at=now - 30)

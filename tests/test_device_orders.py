"""Orders taken on a device (a kiosk, a POS) through the store API reach the kitchen
screen and the printer, once, in the same transaction as the record and its event."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx

from appliance.config import Config
from tests.test_orders_e2e import AUTH, shop, until

ORDER = {"id": "kiosk-0001", "device_id": "kiosk-7", "currency": "EUR", "total_cents": 700,
         "lines": [{"sku": "SKU-000001", "name": "Espresso", "qty": 2, "unit_price_cents": 350}]}


async def test_a_kiosk_order_goes_to_kitchen_and_printer_once(make_config: Callable[..., Config],
                                                               tmp_path: Path) -> None:
    async with shop(make_config, tmp_path, enabled=False) as s, \
            httpx.AsyncClient(base_url=s.api, headers=AUTH, timeout=10) as client:
        first = await client.post("/v1/orders", json=ORDER)
        assert first.status_code == 201, first.text
        again = await client.post("/v1/orders", json=ORDER)
        assert again.status_code == 200  # the same order: recognised, nothing sent twice
        await until(lambda: len(s.kds.accepted) == 1 and len(s.printer.accepted) == 1, "the kiosk order")
        [cmd] = s.kds.accepted
        assert cmd.kind == "order.created"
        assert cmd.body["source"] == "device" and cmd.body["device_id"] == "kiosk-7"
        assert cmd.body["order"]["id"] == "kiosk-0001" and cmd.body["order"]["lines"][0]["qty"] == 2
        assert list(s.pos.accepted) == []  # default routing: kitchen screens and printers
        # A bad order changes nothing and sends nothing: still one command per device.
        bad = await client.post("/v1/orders", json={**ORDER, "id": "kiosk-0002", "lines": []})
        assert bad.status_code == 422
        for device in ("kds-1", "printer-1"):
            listing = (await client.get(f"/v1/devices/{device}/commands")).json()
            assert len(listing["commands"]) == 1, listing


async def test_the_device_that_took_the_order_is_left_out(make_config: Callable[..., Config],
                                                          tmp_path: Path) -> None:
    routing = {"pos": ["order.created"], "kds": ["order.created"]}
    async with shop(make_config, tmp_path, enabled=False, routing=routing) as s, \
            httpx.AsyncClient(base_url=s.api, headers=AUTH, timeout=10) as client:
        answer = await client.post("/v1/orders", json={**ORDER, "device_id": "pos-1"})
        assert answer.status_code == 201
        await until(lambda: len(s.kds.accepted) == 1, "the order on the kitchen screen")
        assert list(s.pos.accepted) == [] and list(s.printer.accepted) == []

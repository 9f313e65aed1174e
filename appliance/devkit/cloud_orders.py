"""Online orders from the simulated platform: the seam to a Service Bus queue.

The platform puts one message per online order on the store's orders queue
(``services.orders`` at pairing). This module makes the orders (deterministic from the
catalog and a number) and hands each one to a ``send_order`` callable; what sends it (an
azure-servicebus sender to the test AMQP peer, for the demo) is injected by the caller, so
the simulator itself needs no Service Bus code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import attrs

from appliance.devkit.cloud_catalog import Catalog

__all__ = ["OrderMessage", "SendOrder", "make_order", "push_orders"]

CHANNELS = ("click_and_collect", "delivery")


@attrs.frozen(kw_only=True)
class OrderMessage:
    """One message: ``message_id`` is the order id (the receiver dedupes by it)."""

    order_id: str
    body: dict[str, Any]


SendOrder = Callable[[OrderMessage], Awaitable[None]]


def make_order(catalog: Catalog, number: int, *, created_at: str) -> OrderMessage:
    """Order ``number`` of the store: 1 to 3 lines of generated products."""
    if catalog.products == 0:
        raise ValueError("the catalog has no products to order")
    draw = hashlib.blake2b(f"{catalog.seed}:order:{number}".encode(), digest_size=16).digest()
    lines = []
    for i in range(1 + draw[0] % 3):
        index = int.from_bytes(draw[1 + 2 * i:3 + 2 * i], "big") % catalog.products
        product = catalog.record_for("product", catalog.sku(index))
        price = catalog.record_for("price", catalog.sku(index))
        assert product is not None and price is not None
        lines.append({"sku": catalog.sku(index), "name": product.data["name"], "qty": 1 + draw[8 + i] % 3,
                      "unit_price_cents": price.data["amount_cents"]})
    order_id = f"web-{number:06d}"
    body = {"order_id": order_id, "channel": CHANNELS[draw[12] % len(CHANNELS)], "created_at": created_at,
            "customer": {"name": f"Customer {number}"}, "currency": catalog.currency,
            "total_cents": sum(line["qty"] * line["unit_price_cents"] for line in lines), "lines": lines,
            "pickup_at": created_at}
    return OrderMessage(order_id=order_id, body=body)


async def push_orders(send_order: SendOrder, orders: Iterable[OrderMessage]) -> int:
    """Send each order in turn; an error from ``send_order`` stops here and propagates."""
    sent = 0
    for order in orders:
        await send_order(order)
        sent += 1
    return sent

"""The order body parser and the routing (appliance.protocol.orders): pure, no I/O."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.protocol.orders import (
    DEFAULT_ROUTING,
    MAX_ORDER_BYTES,
    OrderError,
    choose_routing,
    command_id,
    parse_order,
    parse_routing,
    targets,
)

GOOD: dict[str, Any] = {"order_id": "web-000001", "currency": "EUR", "total_cents": 698,
                        "lines": [{"sku": "SKU-1", "qty": 2, "unit_price_cents": 349}], "vendor_field": [1]}


def body(**changes: Any) -> bytes:
    data = {**GOOD, **changes}
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


def test_a_good_order_keeps_every_field() -> None:
    order = parse_order(body(event="updated"))
    assert (order.order_id, order.kind, order.total_cents, order.line_count) == ("web-000001", "order.updated", 698, 1)
    assert order.as_dict()["vendor_field"] == [1]


@pytest.mark.parametrize(("raw", "reason"), [
    (b"", "the body is empty"),
    (b"\xff", "not UTF-8"),
    (b"{", "not JSON"),
    (b"[1]", "must be a JSON object"),
    (body(order_id="has space"), "order_id"),
    (body(order_id=...), "order_id"),
    (body(currency="eur"), "currency"),
    (body(total_cents=1.5), "total_cents: must be an integer"),
    (body(total_cents=True), "total_cents: must be an integer"),
    (body(lines=[]), "lines: must be a list of 1 to 500"),
    (body(lines=[{"sku": "", "qty": 1, "unit_price_cents": 1}]), r"lines\[0\]\.sku"),
    (body(lines=[{"sku": "a", "qty": 0, "unit_price_cents": 1}]), r"lines\[0\]\.qty: must be at least 1"),
    (body(event="deleted"), "event"),
    (body(customer="bob"), "customer"),
    (b'{"order_id": "a", "x": NaN}', "NaN"),
    (b" " * (MAX_ORDER_BYTES + 1), "at most"),
])
def test_bad_orders_say_why(raw: bytes, reason: str) -> None:
    with pytest.raises(OrderError, match=reason):
        parse_order(raw)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4), max_leaves=20)


@given(st.binary(max_size=400) | json_values.map(lambda v: json.dumps(v).encode())
       | st.dictionaries(st.sampled_from([*sorted(GOOD), "event", "customer"]), json_values).map(
           lambda d: json.dumps({**GOOD, **d}).encode()))
def test_any_body_parses_or_raises_order_error(raw: bytes) -> None:
    with contextlib.suppress(OrderError):
        order = parse_order(raw)
        assert order.kind in ("order.created", "order.updated")


@given(st.dictionaries(st.text(max_size=10), json_values, max_size=5) | json_values)
def test_any_routing_parses_or_raises_order_error(value: Any) -> None:
    with contextlib.suppress(OrderError):
        parse_routing(value)


def test_routing_store_then_config_then_default() -> None:
    store = {"kitchen_screen": ["order.created"], "pos": ["order.created"], "kiosk": ["display"]}
    routing, source = choose_routing(store, {"printer": ("order.created",)})
    assert source == "store"
    devices = [("k1", "kds"), ("p1", "pos"), ("pr1", "printer"), ("ki", "kiosk")]
    assert targets("order.created", devices, routing) == ["k1", "p1"]  # kitchen_screen is kds on the LAN
    routing, source = choose_routing({"pos": "not a list"}, {"printer": ("order.created",)})
    assert (source, targets("order.created", devices, routing)) == ("config", ["pr1"])
    routing, source = choose_routing(None, {})
    assert (routing, source) == (DEFAULT_ROUTING, "default")
    assert targets("order.created", devices, routing) == ["k1", "pr1"]
    assert targets("order.updated", devices, routing) == ["k1"]


@given(st.text(min_size=1, max_size=300), st.text(min_size=1, max_size=100))
def test_command_ids_fit_the_outbox(message_id: str, device_id: str) -> None:
    cid = command_id(message_id, device_id)
    assert len(cid) <= 64 and cid == command_id(message_id, device_id)
    assert cid != command_id(message_id, device_id + "x")

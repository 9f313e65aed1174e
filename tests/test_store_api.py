"""The store API on the api listener (port 8000): replica reads, sales and orders in.

A whole appliance runs in the test's loop (real hypercorn, real SQLite); the replica is
filled through the storage functions the sync service uses.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.devkit.cloud_wire import Event, validate_event
from appliance.protocol.store_api import InvalidRecord, canonical, event_of, parse_order, parse_sale
from appliance.services.runtime import Runtime
from appliance.storage.catalog import ReplicaWrite, apply_changes
from tests.sync_helpers import ADMIN, StartBox, api_client

pytest_plugins = ["tests.sync_fixtures"]

SALE: dict[str, Any] = {
    "id": "6f1c0c2e", "device_id": "pos-1", "currency": "EUR", "total_cents": 698,
    "lines": [{"sku": "SKU-000007", "qty": 2, "unit_price_cents": 349}],
    "payments": [{"method": "card", "amount_cents": 698}],
}
ORDER: dict[str, Any] = {
    "id": "A17", "device_id": "kiosk-1", "currency": "EUR", "total_cents": 1047, "note": "no onions",
    "lines": [{"sku": "SKU-000007", "qty": 3, "unit_price_cents": 349, "name": "Quiche"}],
}


@pytest.fixture
async def box(start_box: StartBox) -> Runtime:
    return await start_box(http={"max_body_bytes": 20_000})


@pytest.fixture
async def api(box: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(box) as client:
        yield client


def products(*items: tuple[str, str]) -> list[ReplicaWrite]:
    return [ReplicaWrite(entity="product", key=sku, name=name, seq=1,
                         data=json.dumps({"sku": sku, "name": name, "active": True})) for sku, name in items]


async def load(box: Runtime, writes: list[ReplicaWrite]) -> None:
    await box.db.write(partial(apply_changes, writes=writes, cursor="9", now=1.0))


def count(box: Runtime, table: str) -> Any:
    return box.db.read(lambda c: c.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


# --- reads -----------------------------------------------------------------------------------


async def test_a_bearer_token_is_required(box: Runtime) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{box.ports['api']}") as anon:
        answer = await anon.get("/v1/products/SKU-1")
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
        wrong = await anon.get("/v1/products/SKU-1", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert (await anon.post("/v1/sales", json=SALE)).status_code == 401
    assert await count(box, "device_sales") == 0


async def test_before_the_first_sync_reads_say_so(box: Runtime, api: httpx.AsyncClient) -> None:
    answer = await api.get("/v1/products/SKU-1")
    assert answer.status_code == 503 and "no copy of the store's catalog yet" in answer.json()["error"]
    await load(box, products(("SKU-1", "Apple")))
    assert (await api.get("/v1/products/SKU-1")).json() == {"sku": "SKU-1", "name": "Apple", "active": True}
    missing = await api.get("/v1/products/SKU-2")
    assert missing.status_code == 404 and "SKU-2" in missing.json()["error"]


async def test_prices_and_stock(box: Runtime, api: httpx.AsyncClient) -> None:
    await load(box, [ReplicaWrite(entity="price", key="A/1", data='{"amount_cents":349,"currency":"EUR"}'),
                     ReplicaWrite(entity="stock", key="A/1", data='{"qty":-2}')])
    assert (await api.get("/v1/prices/A/1")).json() == {"sku": "A/1", "amount_cents": 349, "currency": "EUR"}
    assert (await api.get("/v1/stock/A/1")).json() == {"sku": "A/1", "qty": -2}
    assert (await api.get("/v1/stock/B")).status_code == 404


async def test_search_by_name_prefix_pages_through_everything(box: Runtime, api: httpx.AsyncClient) -> None:
    await load(box, products(*[(f"SKU-{i:03d}", f"Bread {i % 7}") for i in range(40)], ("X", "Éclair"),
                             ("Y", "éclair au café"), ("Z", "Apple")))
    seen: list[str] = []
    params: dict[str, Any] = {"prefix": "bread", "limit": 6}
    while True:
        page = (await api.get("/v1/products", params=params)).json()
        assert len(page["items"]) <= 6
        seen += [p["sku"] for p in page["items"]]
        if page["next"] is None:
            break
        params["after"] = page["next"]
    assert sorted(seen) == [f"SKU-{i:03d}" for i in range(40)] and len(seen) == 40
    names = [(await api.get(f"/v1/products/{s}")).json()["name"] for s in seen]
    assert names == sorted(names)
    eclairs = (await api.get("/v1/products", params={"prefix": "ÉCLAIR"})).json()["items"]
    assert [p["sku"] for p in eclairs] == ["X", "Y"]
    everything = (await api.get("/v1/products", params={"limit": 200})).json()
    assert len(everything["items"]) == 43 and everything["next"] is None


@pytest.mark.parametrize("params", [{"limit": "0"}, {"limit": "201"}, {"limit": "x"}, {"limit": "-1"},
                                    {"after": "not-a-token"}, {"prefix": "x" * 201}])
async def test_bad_search_parameters_are_refused(api: httpx.AsyncClient, params: dict[str, str]) -> None:
    answer = await api.get("/v1/products", params=params)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]


# --- sales and orders --------------------------------------------------------------------------------


async def test_a_sale_is_durable_queued_and_idempotent(box: Runtime, api: httpx.AsyncClient) -> None:
    seen = box.uplink_changes.version
    created = await api.post("/v1/sales", json=SALE)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["sale"] == {k: v for k, v in SALE.items()}
    assert body["upload"] == {"event_id": "sale-6f1c0c2e", "state": "queued"}
    assert box.uplink_changes.version == seen + 1
    # On disk before the answer: the record and its event, in the database file itself.
    conn = sqlite3.connect(box.db.path)
    try:
        event = json.loads(conn.execute("SELECT body FROM events_outbox WHERE id = 'sale-6f1c0c2e'").fetchone()[0])
        assert conn.execute("SELECT count(*) FROM device_sales").fetchone()[0] == 1
    finally:
        conn.close()
    assert event["type"] == "sale" and event["data"]["lines"] == SALE["lines"]
    assert event["at"] == body["received_at"]
    # The same post again (keys in another order, spaces): 200, the same record, nothing new.
    again = await api.post("/v1/sales", content=json.dumps(dict(reversed(SALE.items())), indent=2),
                           headers={"Content-Type": "application/json"})
    assert again.status_code == 200 and again.json()["sale"] == body["sale"]
    assert again.json()["received_at"] == body["received_at"]
    assert box.uplink_changes.version == seen + 1
    assert await count(box, "events_outbox") == 1
    # The same id with another body: 409, nothing changes.
    conflict = await api.post("/v1/sales", json={**SALE, "payments": [{"method": "cash", "amount_cents": 698}]})
    assert conflict.status_code == 409 and "different body" in conflict.json()["error"]
    assert (await api.get("/v1/sales/6f1c0c2e")).json()["sale"]["total_cents"] == 698
    assert (await api.get("/v1/sales/nope")).status_code == 404


async def test_an_order_goes_up_as_its_first_status(box: Runtime, api: httpx.AsyncClient) -> None:
    created = await api.post("/v1/orders", json=ORDER)
    assert created.status_code == 201, created.text
    event = await box.db.read(lambda c: json.loads(
        c.execute("SELECT body FROM events_outbox WHERE id = 'order-A17'").fetchone()[0]))
    assert event["type"] == "order.status"
    assert event["data"]["order_id"] == "A17" and event["data"]["status"] == "received"
    assert event["data"]["lines"][0]["name"] == "Quiche"
    assert (await api.post("/v1/orders", json=ORDER)).status_code == 200
    assert (await api.get("/v1/orders/A17")).json()["order"]["note"] == "no onions"
    # A sale may share the id of an order: they are different events.
    assert (await api.post("/v1/sales", json={**SALE, "id": "A17"})).status_code == 201


@pytest.mark.parametrize(("body", "errors"), [
    ({**SALE, "lines": [{"sku": "A", "qty": 0, "unit_price_cents": 1}]}, ["lines[0].qty: must not be 0"]),
    ({**SALE, "lines": [{"sku": "A", "qty": "2", "unit_price_cents": 1}]},
     ["lines[0].qty: expected integer, got string"]),
    ({**SALE, "lines": []}, ["lines: must hold 1 to 500 items, got 0"]),
    ({**SALE, "currency": "eur"}, ["currency: must be 3 capital letters (ISO 4217, e.g. EUR), got 'eur'"]),
    ({**SALE, "total_cents": True}, ["total_cents: expected integer, got boolean"]),
    ({**SALE, "id": "has space"}, ["id: 1 to 120 characters of A-Z a-z 0-9 . _ : - (got 'has space')"]),
    ({**SALE, "at": "yesterday"},
     ["at: must be an RFC 3339 time with an offset (2025-03-01T09:30:00Z), got 'yesterday'"]),
    ({**SALE, "tip": 1}, ["(body): unknown field(s) tip"]),
    ({k: v for k, v in SALE.items() if k != "device_id"}, ["device_id: required field is missing"]),
    ({**SALE, "payments": [{"method": "card"}]}, ["payments[0].amount_cents: required field is missing"]),
    ({**SALE, "device_id": "\ud800"}, ["device_id: not valid Unicode text (a lone surrogate)"]),
    ({**SALE, "total_cents": 699},
     ["total_cents: must be the sum of the lines (qty x unit_price_cents), 698; got 699"]),
    ({**SALE, "lines": [{"sku": "A\u0000", "qty": 2, "unit_price_cents": 349}]},
     ["lines[0].sku: printable characters only (docs/hardening.md); character 1 is U+0000 "
      "(a control or unassigned character)"]),
    ({**SALE, "lines": [{"sku": "gpj.\u202eexe", "qty": 2, "unit_price_cents": 349}]},
     ["lines[0].sku: printable characters only (docs/hardening.md); character 4 is U+202E "
      "(RIGHT-TO-LEFT OVERRIDE)"]),
    ({**SALE, "device_id": " pos-1"}, ["device_id: printable characters only (docs/hardening.md); "
                                       "leading or trailing spaces"]),
    ([SALE], ["(body): expected a JSON object, got list"]),
])
async def test_invalid_sales_are_refused_with_their_paths(box: Runtime, api: httpx.AsyncClient, body: Any,
                                                          errors: list[str]) -> None:
    answer = await api.post("/v1/sales", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert answer.status_code == 422, answer.text
    assert answer.json() == {"error": "not a valid sale", "errors": errors}
    assert await count(box, "device_sales") == 0 and await count(box, "events_outbox") == 0


async def test_bad_bodies_lose_nothing(box: Runtime, api: httpx.AsyncClient) -> None:
    assert (await api.post("/v1/sales", json=SALE)).status_code == 201
    not_json = await api.post("/v1/sales", content=b"{not json", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400
    big = {**SALE, "id": "big", "lines": [SALE["lines"][0]] * 400}
    too_big = await api.post("/v1/sales", json=big)
    assert too_big.status_code == 413 and "20000" in too_big.json()["error"]
    assert await count(box, "device_sales") == 1 and await count(box, "events_outbox") == 1
    assert (await api.get("/v1/sales/6f1c0c2e")).status_code == 200


async def test_concurrent_posts_of_one_sale_make_one_record(box: Runtime, api: httpx.AsyncClient) -> None:
    statuses: list[int] = []

    async def post() -> None:
        statuses.append((await api.post("/v1/sales", json=SALE)).status_code)

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(post)
    assert sorted(statuses) == [200] * 7 + [201]
    assert await count(box, "events_outbox") == 1


async def test_an_unpaired_box_takes_a_code_without_the_token_and_checks_the_body(box: Runtime) -> None:
    # Day one: a box that was never paired takes a code from anyone (the one-time code from
    # the back office is the proof); a paired box asks for its admin credential
    # (tests/test_owner.py). Here no platform answers, so a well-formed try ends in 502.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{box.ports['admin']}") as admin:
        assert (await admin.post("/api/pairing", json={"code": "X"})).status_code == 502
        assert (await admin.post("/api/pairing", json={"nope": 1})).status_code == 400
        bad = await admin.post("/api/pairing", json={"nope": 1}, headers={"Authorization": f"Bearer {ADMIN}"})
        assert bad.status_code == 400


# --- the parsers -------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**13), max_value=10**13) | st.floats(allow_nan=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(st.sampled_from([*SALE, "at", "note", "x"]), json_values, max_size=8))
@settings(max_examples=150)
def test_any_body_parses_or_raises_invalid_record(body: dict[str, Any]) -> None:
    for parse in (parse_sale, parse_order):
        try:
            record = parse(body)
        except InvalidRecord as exc:
            assert exc.errors and all(": " in line for line in exc.errors)
        else:
            assert parse(canonical(record)) == record


ids = st.text(alphabet="abcXYZ019._:-", min_size=1, max_size=120)
valid_sales = st.builds(
    lambda i, dev, cur, lines, pays: {"id": i, "device_id": dev, "currency": cur, "lines": lines, "payments": pays,
                                      "total_cents": sum(x["qty"] * x["unit_price_cents"] for x in lines)},
    ids, st.text(alphabet=st.characters(exclude_categories=["Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"]),
                 min_size=1, max_size=128).filter(lambda t: t == t.strip()),
    st.from_regex(r"[A-Z]{3}", fullmatch=True),
    st.lists(st.fixed_dictionaries({"sku": st.text(alphabet="ABC-0123", min_size=1, max_size=20),
                                    "qty": st.integers(-50, 50).filter(bool),
                                    "unit_price_cents": st.integers(0, 10**6)}), min_size=1, max_size=5),
    st.lists(st.fixed_dictionaries({"method": st.sampled_from(["card", "cash"]),
                                    "amount_cents": st.integers(-(10**6), 10**6)}), max_size=3),
)


@given(valid_sales)
@settings(max_examples=200)
def test_a_sale_the_box_accepts_is_an_event_the_platform_accepts(body: dict[str, Any]) -> None:
    sale = parse_sale(body)
    assert parse_sale(json.loads(json.dumps(canonical(sale)))) == sale
    event = event_of(sale, received_at="2025-03-01T09:30:00.000Z")
    outcome = validate_event(json.loads(json.dumps(event)), 0)
    assert isinstance(outcome, Event), outcome


def test_an_order_the_box_accepts_is_an_event_the_platform_accepts() -> None:
    order = parse_order(ORDER)
    event = event_of(order, received_at="2025-03-01T09:30:00.000Z")
    outcome = validate_event(json.loads(json.dumps(event)), 0)
    assert isinstance(outcome, Event), outcome
    assert outcome.data["lines"] == ORDER["lines"] and outcome.data["note"] == "no onions"

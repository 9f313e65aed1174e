"""The cloud simulator against docs/cloud-contract.md: real hypercorn, real TLS (trustme CA),
httpx on loopback. The pure parts (wire parsing, the feed) also get hypothesis tests."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.devkit.cloud import (
    OrderMessage,
    SimConfig,
    SimHandle,
    catalog_digest,
    run_cloud_simulator,
)
from appliance.devkit.cloud_faults import parse_fault
from appliance.devkit.cloud_state import CloudState
from appliance.devkit.cloud_wire import (
    CloudApiError,
    Event,
    Rejection,
    parse_cursor,
    parse_events,
    parse_heartbeat,
    parse_limit,
    parse_mutation,
    parse_pair,
    validate_event,
)

STORE = "store-0001"
CODE = "PAIR-0001"
Replica = dict[tuple[str, str], dict[str, Any]]
StartSim = Callable[..., Awaitable[SimHandle]]


@pytest.fixture
def start_sim(nursery: trio.Nursery, tmp_path: Path) -> StartSim:
    async def start(**overrides: Any) -> SimHandle:
        config = SimConfig(**{"products": 5, "tls_dir": str(tmp_path / "tls"), **overrides})
        handle: SimHandle = await nursery.start(run_cloud_simulator, config)
        return handle

    return start


@pytest.fixture
async def sim(start_sim: StartSim) -> SimHandle:
    return await start_sim()


@pytest.fixture
async def client(sim: SimHandle) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim.url, verify=sim.ssl_context(), trust_env=False) as c:
        yield c


async def pair(client: httpx.AsyncClient, appliance_id: str = "box-1") -> dict[str, Any]:
    r = await client.post("/v1/appliances/pair", json={"code": CODE, "appliance_id": appliance_id,
                                                        "firmware": "0.1.0"})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def authed(client: httpx.AsyncClient, appliance_id: str = "box-1") -> dict[str, str]:
    return {"Authorization": f"Bearer {(await pair(client, appliance_id))['token']}"}


def apply(replica: Replica, changes: list[dict[str, Any]]) -> None:
    for change in changes:
        ident = (change["entity"], change["key"])
        if change["op"] == "upsert":
            replica[ident] = change["data"]
        else:
            assert change["op"] == "delete" and change["data"] is None
            replica.pop(ident, None)


def digest(replica: Replica) -> str:
    return catalog_digest((e, k, d) for (e, k), d in replica.items())


async def read_feed(client: httpx.AsyncClient, headers: dict[str, str], replica: Replica, cursor: str,
                    limit: int = 7) -> str:
    while True:
        r = await client.get(f"/v1/stores/{STORE}/changes", params={"cursor": cursor, "limit": limit},
                             headers=headers)
        assert r.status_code == 200, r.text
        page = r.json()
        apply(replica, page["changes"])
        cursor = page["cursor"]
        if not page["more"]:
            return cursor


async def read_snapshot(client: httpx.AsyncClient, headers: dict[str, str]) -> tuple[Replica, str]:
    replica: Replica = {}
    async with client.stream("GET", f"/v1/stores/{STORE}/snapshot", headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) async for line in r.aiter_lines() if line]
    final = lines.pop()
    assert final["count"] == len(lines)
    for line in lines:
        replica[(line["entity"], line["key"])] = line["data"]
    return replica, final["cursor"]


async def sim_catalog(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.get("/_sim/catalog")
    assert r.status_code == 200
    body: dict[str, Any] = r.json()
    return body


# -- pairing and auth --------------------------------------------------------------------------


async def test_pairing_gives_a_token_the_services_and_the_store_secret(client: httpx.AsyncClient) -> None:
    body = await pair(client, "box-7f3a")
    assert body["store_id"] == STORE
    services = body["services"]
    assert set(services) == {"orders", "support", "media", "logs", "store_secret"}
    assert set(services["orders"]) == {"namespace", "queue", "sas_key_name", "sas_key"}
    assert services["orders"]["namespace"] == "e-serversync-ns.servicebus.windows.net"
    assert services["support"]["queue"] == "appliance-box-7f3a-support"
    assert services["media"]["base_url"].endswith(f"/blob/{STORE}/")
    assert len(bytes.fromhex(services["store_secret"])) == 32
    r = await client.get(f"/v1/stores/{STORE}/changes", headers={"Authorization": f"Bearer {body['token']}"})
    assert r.status_code == 200


async def test_services_the_store_lacks_are_null(start_sim: StartSim) -> None:
    sim = await start_sim(orders=None, support=None, media=False, logs_url=None)
    async with httpx.AsyncClient(base_url=sim.url, verify=sim.ssl_context()) as client:
        services = (await pair(client))["services"]
    assert services["orders"] is services["support"] is services["media"] is services["logs"] is None
    assert len(services["store_secret"]) == 64


@pytest.mark.parametrize(("body", "status", "error"), [
    ({"code": "WRONG", "appliance_id": "box-1", "firmware": "0.1"}, 404, "pair_code_unknown"),
    ({"code": CODE, "appliance_id": "box-1"}, 400, "invalid_body"),
    ({"code": CODE, "appliance_id": "box-1", "firmware": "0.1", "extra": 1}, 400, "invalid_body"),
    ({"code": CODE, "appliance_id": "", "firmware": "0.1"}, 400, "invalid_body"),
    ({"code": 7, "appliance_id": "box-1", "firmware": "0.1"}, 400, "invalid_body"),
    ([CODE], 400, "invalid_body"),
])
async def test_pairing_refuses_a_wrong_code_or_body_with_a_reason(client: httpx.AsyncClient, body: Any,
                                                                  status: int, error: str) -> None:
    r = await client.post("/v1/appliances/pair", json=body)
    assert (r.status_code, r.json()["error"]) == (status, error)
    assert r.json()["reason"]


async def test_pairing_code_is_bound_to_the_first_appliance_and_repairing_revokes(
        client: httpx.AsyncClient) -> None:
    first = await pair(client, "box-1")
    r = await client.post("/v1/appliances/pair", json={"code": CODE, "appliance_id": "box-2", "firmware": "0.1"})
    assert (r.status_code, r.json()["error"]) == (403, "pair_code_used")
    second = await pair(client, "box-1")
    assert second["token"] != first["token"]
    r = await client.get(f"/v1/stores/{STORE}/changes", headers={"Authorization": f"Bearer {first['token']}"})
    assert r.status_code == 401 and "revoked" in r.json()["reason"]


async def test_bodies_must_be_json_and_under_the_limit(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/appliances/pair", content=b"code=1", headers={"Content-Type": "text/plain"})
    assert (r.status_code, r.json()["error"]) == (415, "unsupported_media_type")
    r = await client.post("/v1/appliances/pair", content=b"{not json", headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]) == (400, "invalid_body")
    headers = await authed(client)
    big = json.dumps({"events": [], "pad": "x" * (1024 * 1024)}).encode()
    r = await client.post(f"/v1/stores/{STORE}/events", content=big,
                          headers={**headers, "Content-Type": "application/json", "Idempotency-Key": "k1"})
    assert (r.status_code, r.json()["error"]) == (413, "body_too_large")


async def test_auth_missing_unknown_revoked_and_wrong_store(client: httpx.AsyncClient) -> None:
    url = f"/v1/stores/{STORE}/changes"
    r = await client.get(url)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    assert r.json()["error"] == "unauthorized"
    r = await client.get(url, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    r = await client.get(url, headers={"Authorization": "Basic abc"})
    assert r.status_code == 401
    headers = await authed(client)
    r = await client.get("/v1/stores/store-0002/changes", headers=headers)
    assert (r.status_code, r.json()["error"]) == (403, "forbidden")
    assert (await client.get(url, headers=headers)).status_code == 200
    r = await client.post("/_sim/revoke", json={})
    assert r.json() == {"revoked": 1}
    r = await client.get(url, headers=headers)
    assert r.status_code == 401 and "revoked" in r.json()["reason"]
    # Revoked everywhere: events and heartbeat too, and nothing is stored.
    r = await client.post(f"/v1/stores/{STORE}/events", json={"events": []},
                          headers={**headers, "Idempotency-Key": "k"})
    assert r.status_code == 401


async def test_unknown_routes_and_methods_answer_json(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/nothing")
    assert (r.status_code, r.json()["error"]) == (404, "not_found")
    r = await client.delete("/v1/appliances/pair")
    assert (r.status_code, r.json()["error"]) == (405, "method_not_allowed")


# -- the feed ----------------------------------------------------------------------------------


async def test_changes_page_with_more_and_cover_the_whole_catalog(sim: SimHandle,
                                                                  client: httpx.AsyncClient) -> None:
    headers = await authed(client)
    seqs: list[int] = []
    mores: list[bool] = []
    cursor = "0"
    replica: Replica = {}
    while True:
        r = await client.get(f"/v1/stores/{STORE}/changes", params={"cursor": cursor, "limit": 10},
                             headers=headers)
        page = r.json()
        seqs += [c["seq"] for c in page["changes"]]
        mores.append(page["more"])
        apply(replica, page["changes"])
        cursor = page["cursor"]
        if not page["more"]:
            break
    assert seqs == list(range(1, 26))  # 1 store_config + 4 devices + 4 records x 5 products
    assert mores == [True, True, False]
    assert cursor == "25"
    assert digest(replica) == (await sim_catalog(client))["digest"]
    entities = {e for e, _ in replica}
    assert entities == {"product", "price", "stock", "device", "store_config", "media"}
    # Caught up: the same cursor back, no changes.
    r = await client.get(f"/v1/stores/{STORE}/changes", params={"cursor": cursor}, headers=headers)
    assert r.json() == {"changes": [], "cursor": "25", "more": False}


@pytest.mark.parametrize(("params", "status", "error"), [
    ({"cursor": "abc"}, 400, "invalid_cursor"),
    ({"cursor": "-1"}, 400, "invalid_cursor"),
    ({"limit": "0"}, 400, "invalid_limit"),
    ({"limit": "1001"}, 400, "invalid_limit"),
    ({"limit": "x"}, 400, "invalid_limit"),
    ({"cursor": "26"}, 410, "cursor_expired"),
])
async def test_changes_refuse_bad_parameters(client: httpx.AsyncClient, params: dict[str, str], status: int,
                                             error: str) -> None:
    r = await client.get(f"/v1/stores/{STORE}/changes", params=params, headers=await authed(client))
    assert (r.status_code, r.json()["error"]) == (status, error)


async def test_upserts_and_deletes_show_in_the_feed(sim: SimHandle, client: httpx.AsyncClient) -> None:
    headers = await authed(client)
    replica: Replica = {}
    cursor = await read_feed(client, headers, replica, "0")
    r = await client.post("/_sim/mutate", json={
        "upserts": [{"entity": "price", "key": "SKU-000002", "data": {"sku": "SKU-000002", "amount_cents": 1,
                                                                      "currency": "EUR"}},
                    {"entity": "product", "key": "NEW-1", "data": {"sku": "NEW-1", "name": "New"}}],
        "deletes": [{"entity": "stock", "key": "SKU-000003"}]})
    assert r.status_code == 200 and r.json()["seqs"] == [26, 27, 28]
    sim.state.delete("device", "dev-kiosk-1")  # in-process mutation, same feed
    r = await client.get(f"/v1/stores/{STORE}/changes", params={"cursor": cursor}, headers=headers)
    page = r.json()
    assert [(c["seq"], c["entity"], c["op"], c["key"]) for c in page["changes"]] == [
        (26, "price", "upsert", "SKU-000002"), (27, "product", "upsert", "NEW-1"),
        (28, "stock", "delete", "SKU-000003"), (29, "device", "delete", "dev-kiosk-1")]
    assert page["changes"][2]["data"] is None
    apply(replica, page["changes"])
    assert replica[("price", "SKU-000002")]["amount_cents"] == 1
    assert ("stock", "SKU-000003") not in replica
    assert digest(replica) == (await sim_catalog(client))["digest"]


async def test_bad_mutations_are_refused_and_change_nothing(sim: SimHandle, client: httpx.AsyncClient) -> None:
    before = sim.state.cursor
    for body in ({"upserts": [{"entity": "spaceship", "key": "x", "data": {}}]},
                 {"upserts": [{"entity": "price", "key": "x"}]},
                 {"deletes": "all"}, {"drop": []}):
        r = await client.post("/_sim/mutate", json=body)
        assert (r.status_code, r.json()["error"]) == (400, "invalid_body"), body
    assert sim.state.cursor == before


async def test_old_cursor_gets_410_then_the_snapshot_continues_the_feed_without_gap(
        start_sim: StartSim) -> None:
    sim = await start_sim(retention=10)
    state = sim.state
    async with httpx.AsyncClient(base_url=sim.url, verify=sim.ssl_context()) as client:
        headers = await authed(client)
        r = await client.get(f"/v1/stores/{STORE}/changes", params={"cursor": "0"}, headers=headers)
        assert r.status_code == 410
        assert r.json() == {"error": "cursor_expired", "reason": r.json()["reason"], "oldest_cursor": "15"}
        replica, cursor = await read_snapshot(client, headers)
        assert cursor == "25"
        state.upsert("price", "SKU-000005", {"sku": "SKU-000005", "amount_cents": 9999, "currency": "EUR"})
        state.delete("product", "SKU-000004")
        state.upsert("product", "LATE-1", {"sku": "LATE-1"})
        for n in range(5):
            state.upsert("stock", "SKU-000001", {"sku": "SKU-000001", "qty": n})
        cursor = await read_feed(client, headers, replica, cursor)
        assert cursor == state.cursor == "33"
        assert replica[("price", "SKU-000005")]["amount_cents"] == 9999
        assert ("product", "SKU-000004") not in replica and ("product", "LATE-1") in replica
        assert digest(replica) == (await sim_catalog(client))["digest"]
        # Past retention again: the old snapshot cursor is now too old too.
        for n in range(10):
            state.upsert("stock", "SKU-000002", {"sku": "SKU-000002", "qty": n})
        r = await client.get(f"/v1/stores/{STORE}/changes", params={"cursor": cursor}, headers=headers)
        assert r.status_code == 200 and len(r.json()["changes"]) == 10  # exactly the last K
        state.upsert("stock", "SKU-000002", {"sku": "SKU-000002", "qty": 99})
        r = await client.get(f"/v1/stores/{STORE}/changes", params={"cursor": cursor}, headers=headers)
        assert r.status_code == 410


async def test_a_snapshot_read_while_the_catalog_changes_stays_at_its_cursor(start_sim: StartSim) -> None:
    # 20,000 products: about 13 MB of lines, more than the socket buffers hold, so the
    # server is still generating when the catalog changes.
    sim = await start_sim(products=20_000)
    state = sim.state
    last = "SKU-020000"
    async with httpx.AsyncClient(base_url=sim.url, verify=sim.ssl_context()) as client:
        headers = await authed(client)
        replica: Replica = {}
        async with client.stream("GET", f"/v1/stores/{STORE}/snapshot", headers=headers) as resp:
            lines = resp.aiter_lines()
            first = json.loads(await anext(lines))
            replica[(first["entity"], first["key"])] = first["data"]
            state.upsert("price", last, {"sku": last, "amount_cents": 9999, "currency": "EUR"})
            state.delete("stock", last)
            state.upsert("product", "LATE-1", {"sku": "LATE-1"})
            rest = [json.loads(line) async for line in lines if line]
        final = rest.pop()
        for line in rest:
            replica[(line["entity"], line["key"])] = line["data"]
        assert final == {"cursor": "80005", "count": 80005}
        assert replica[("price", last)]["amount_cents"] != 9999
        assert ("stock", last) in replica and ("product", "LATE-1") not in replica
        assert await read_feed(client, headers, replica, final["cursor"], limit=500) == "80008"
        assert digest(replica) == (await sim_catalog(client))["digest"]


async def test_a_cut_snapshot_stream_is_seen_as_an_error(sim: SimHandle, client: httpx.AsyncClient) -> None:
    headers = await authed(client)
    r = await client.post("/_sim/faults", json={"kind": "cut", "after_lines": 7, "path": f"/v1/stores/{STORE}/snap"})
    assert r.status_code == 200
    got: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream("GET", f"/v1/stores/{STORE}/snapshot", headers=headers) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                got.append(line)
    assert len([line for line in got if line]) <= 7
    assert not any('"cursor"' in line for line in got)
    # The rule is used up: the next snapshot is whole.
    replica, cursor = await read_snapshot(client, headers)
    assert cursor == "25" and digest(replica) == (await sim_catalog(client))["digest"]


async def test_snapshot_of_a_large_catalog_is_streamed(start_sim: StartSim) -> None:
    sim = await start_sim(products=5000)
    async with httpx.AsyncClient(base_url=sim.url, verify=sim.ssl_context()) as client:
        headers = await authed(client)
        chunks = 0
        count = 0
        final: dict[str, Any] = {}
        async with client.stream("GET", f"/v1/stores/{STORE}/snapshot", headers=headers) as resp:
            assert "content-length" not in resp.headers
            assert resp.headers["transfer-encoding"] == "chunked"
            async for chunk in resp.aiter_raw():
                chunks += 1
                count += chunk.count(b"\n")
                if b'"cursor"' in chunk:
                    final = json.loads(chunk.rstrip(b"\n").rsplit(b"\n", 1)[-1])
        assert final == {"cursor": "20005", "count": 20005}
        assert count == 20006
        assert chunks > 10  # many writes, not one body


async def test_a_reader_that_goes_away_stops_the_snapshot(start_sim: StartSim) -> None:
    sim = await start_sim(products=100_000)
    async with httpx.AsyncClient(base_url=sim.url, verify=sim.ssl_context()) as client:
        headers = await authed(client)
        async with client.stream("GET", f"/v1/stores/{STORE}/snapshot", headers=headers) as resp:
            assert resp.status_code == 200
            assert sim.state.snapshot_streams == 1
        # Leaving the block unread closes the connection.
    # Streaming all 400,005 lines takes seconds; a stopped generator ends at once.
    with trio.fail_after(1.5):
        # The state is pure (no trio event to wait on): poll its counter.
        while sim.state.snapshot_streams:  # noqa: ASYNC110
            await trio.sleep(0.01)


# -- events ------------------------------------------------------------------------------------


def sale(event_id: str, qty: int = 2) -> dict[str, Any]:
    return {"id": event_id, "type": "sale", "at": "2025-03-01T09:30:00Z",
            "data": {"device_id": "dev-pos-1", "currency": "EUR", "total_cents": 349 * qty,
                     "lines": [{"sku": "SKU-000001", "qty": qty, "unit_price_cents": 349}],
                     "payments": [{"method": "card", "amount_cents": 349 * qty}]}}


def order_status(event_id: str) -> dict[str, Any]:
    return {"id": event_id, "type": "order.status", "at": "2025-03-01T09:31:00+01:00",
            "data": {"order_id": "A17", "status": "ready"}}


def device_status(event_id: str) -> dict[str, Any]:
    return {"id": event_id, "type": "device.status", "at": "2025-03-01T09:31:05.250Z",
            "data": {"device_id": "dev-kitchen-1", "status": "offline", "detail": "no answer", "extra": 1}}


async def post_events(client: httpx.AsyncClient, headers: dict[str, str], events: list[Any],
                      key: str | None) -> httpx.Response:
    extra = {"Idempotency-Key": key} if key is not None else {}
    return await client.post(f"/v1/stores/{STORE}/events", json={"events": events}, headers={**headers, **extra})


async def stored_events(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = (await client.get("/_sim/events")).json()["events"]
    return events


async def test_events_are_deduplicated_by_id_and_replayed_by_key(client: httpx.AsyncClient) -> None:
    headers = await authed(client)
    batch = [sale("sale-1"), order_status("ord-A17-ready"), device_status("dev-k1-1")]
    r = await post_events(client, headers, batch, "batch-1")
    assert r.status_code == 200 and "Idempotent-Replayed" not in r.headers
    assert r.json() == {"accepted": ["sale-1", "ord-A17-ready", "dev-k1-1"], "rejected": []}
    # The same ids under a new key: accepted again, stored once.
    r = await post_events(client, headers, [sale("sale-1"), sale("sale-2")], "batch-2")
    assert r.json() == {"accepted": ["sale-1", "sale-2"], "rejected": []}
    stored = await stored_events(client)
    assert [e["id"] for e in stored] == ["sale-1", "ord-A17-ready", "dev-k1-1", "sale-2"]
    assert stored[0]["data"] == sale("sale-1")["data"] and stored[0]["idempotency_key"] == "batch-1"
    assert stored[2]["data"]["extra"] == 1  # unknown fields inside data are kept
    assert (await client.get("/_sim/events")).json()["redelivered"] == {"sale-1": 2}
    # The same key and body: the first answer, replayed.
    first = await post_events(client, headers, batch, "batch-1")
    assert first.status_code == 200 and first.headers["Idempotent-Replayed"] == "true"
    assert first.json() == {"accepted": ["sale-1", "ord-A17-ready", "dev-k1-1"], "rejected": []}
    # A replay (a retry of the same batch) is not a re-send: not counted.
    assert (await client.get("/_sim/events")).json()["redelivered"] == {"sale-1": 2}
    # The same key with another body: refused.
    r = await post_events(client, headers, [sale("sale-3")], "batch-1")
    assert (r.status_code, r.json()["error"]) == (422, "idempotency_key_reused")
    # The same id with other content: rejected, the first copy kept.
    r = await post_events(client, headers, [sale("sale-1", qty=5)], "batch-3")
    assert r.json() == {"accepted": [], "rejected": [{"id": "sale-1", "index": 0,
                                                      "reason": "id already used with other content"}]}
    assert len(await stored_events(client)) == 4


@pytest.mark.parametrize(("key", "error"), [(None, "idempotency_key_missing"), ("", "idempotency_key_missing"),
                                            ("has space", "idempotency_key_invalid"),
                                            ("x" * 129, "idempotency_key_invalid")])
async def test_events_need_a_valid_idempotency_key(client: httpx.AsyncClient, key: str | None,
                                                   error: str) -> None:
    headers = await authed(client)
    r = await post_events(client, headers, [sale("sale-1")], key)
    assert (r.status_code, r.json()["error"]) == (400, error)
    assert await stored_events(client) == []


async def test_invalid_events_are_rejected_with_reasons_and_the_rest_kept(client: httpx.AsyncClient) -> None:
    headers = await authed(client)
    bad_qty = sale("sale-q")
    bad_qty["data"]["lines"][0]["qty"] = 0
    no_tz = sale("sale-tz")
    no_tz["at"] = "2025-03-01T09:30:00"
    batch: list[Any] = [sale("ok-1"), bad_qty, {"id": "x", "type": "refund", "at": "2025-03-01T09:30:00Z",
                                                "data": {}},
                        no_tz, "not an object", {**order_status("o-1"), "extra": 1},
                        {**order_status("o-2"), "data": {"order_id": "A1", "status": "eaten"}},
                        {**sale("bad id!")}, order_status("ok-2")]
    r = await post_events(client, headers, batch, "mixed")
    body = r.json()
    assert r.status_code == 200
    assert body["accepted"] == ["ok-1", "ok-2"]
    reasons = {(x["index"], x["id"]): x["reason"] for x in body["rejected"]}
    assert set(reasons) == {(1, "sale-q"), (2, "x"), (3, "sale-tz"), (4, None), (5, "o-1"), (6, "o-2"),
                            (7, None)}
    assert reasons[(1, "sale-q")] == "data.lines[0].qty: must not be 0"
    assert reasons[(2, "x")].startswith("type: must be one of")
    assert "offset" in reasons[(3, "sale-tz")]
    assert "unknown fields: extra" in reasons[(5, "o-1")]
    assert reasons[(6, "o-2")].startswith("data.status: must be one of")
    assert [e["id"] for e in await stored_events(client)] == ["ok-1", "ok-2"]


@pytest.mark.parametrize("body", [b"[]", b'{"events": {}}', b'{"events": [], "more": 1}', b"\xff",
                                  b'{"events": [], "events": []}', b'{"events": [NaN]}',
                                  json.dumps({"events": [{}] * 501}).encode()])
async def test_a_bad_events_request_stores_nothing(client: httpx.AsyncClient, body: bytes) -> None:
    headers = await authed(client)
    r = await client.post(f"/v1/stores/{STORE}/events", content=body,
                          headers={**headers, "Content-Type": "application/json", "Idempotency-Key": "k"})
    assert (r.status_code, r.json()["error"]) == (400, "invalid_body")
    # A 400 is not remembered: the same key with a good body goes through.
    r = await post_events(client, headers, [sale("s1")], "k")
    assert r.status_code == 200 and r.json()["accepted"] == ["s1"]


async def test_answer_lost_after_commit_then_the_retry_replays_it(client: httpx.AsyncClient) -> None:
    headers = await authed(client)
    r = await client.post("/_sim/faults", json={"kind": "drop", "path": f"/v1/stores/{STORE}/events"})
    assert r.status_code == 200
    with pytest.raises(httpx.RemoteProtocolError):
        await post_events(client, headers, [sale("sale-1")], "batch-1")
    # The platform committed it although the appliance never saw the answer.
    assert [e["id"] for e in await stored_events(client)] == ["sale-1"]
    r = await post_events(client, headers, [sale("sale-1")], "batch-1")
    assert r.status_code == 200 and r.headers["Idempotent-Replayed"] == "true"
    assert r.json() == {"accepted": ["sale-1"], "rejected": []}
    assert len(await stored_events(client)) == 1


# -- faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "error"), [(503, "unavailable"), (429, "rate_limited")])
async def test_status_fault_n_times_with_retry_after_then_ok(client: httpx.AsyncClient, status: int,
                                                             error: str) -> None:
    headers = await authed(client)
    r = await client.post("/_sim/faults", json={"status": status, "retry_after": 7, "count": 2,
                                                "path": "/v1/stores/"})
    assert r.json()["faults"][0]["kind"] == "status"
    url = f"/v1/stores/{STORE}/changes"
    for _ in range(2):
        r = await client.get(url, headers=headers)
        assert (r.status_code, r.headers["Retry-After"], r.json()["error"]) == (status, "7", error)
    assert (await client.get(url, headers=headers)).status_code == 200
    assert (await client.get("/_sim/faults")).json() == {"faults": []}


async def test_early_answers_reach_a_client_still_sending_its_body(client: httpx.AsyncClient) -> None:
    # 503 from the fault layer and 401 from auth come before the body is read; the server
    # reads the rest first, so the client gets the answer rather than a reset connection.
    headers = await authed(client)
    big = [sale(f"sale-{i}") for i in range(500)]
    body = json.dumps({"events": big, "pad": "x" * 600_000}).encode()
    await client.post("/_sim/faults", json={"status": 503, "retry_after": 3, "count": 3})
    for _ in range(3):
        r = await client.post(f"/v1/stores/{STORE}/events", content=body,
                              headers={**headers, "Content-Type": "application/json", "Idempotency-Key": "k"})
        assert (r.status_code, r.headers["Retry-After"]) == (503, "3")
    await client.post("/_sim/revoke", json={})
    for _ in range(3):
        r = await client.post(f"/v1/stores/{STORE}/events", content=body,
                              headers={**headers, "Content-Type": "application/json", "Idempotency-Key": "k"})
        assert r.status_code == 401
    assert await stored_events(client) == []


async def test_faults_match_their_path_and_method_and_can_be_cleared(client: httpx.AsyncClient) -> None:
    headers = await authed(client)
    await client.post("/_sim/faults", json={"status": 503, "count": 5, "path": f"/v1/stores/{STORE}/events",
                                            "method": "POST"})
    assert (await client.get(f"/v1/stores/{STORE}/changes", headers=headers)).status_code == 200
    assert (await post_events(client, headers, [], "k")).status_code == 503
    assert (await client.delete("/_sim/faults")).json() == {"faults": []}
    assert (await post_events(client, headers, [], "k")).status_code == 200


async def test_latency_fault_delays_the_answer(client: httpx.AsyncClient) -> None:
    headers = await authed(client)
    await client.post("/_sim/faults", json={"kind": "latency", "delay_s": 0.2})
    start = trio.current_time()
    assert (await client.get(f"/v1/stores/{STORE}/changes", headers=headers)).status_code == 200
    assert trio.current_time() - start >= 0.2
    start = trio.current_time()
    assert (await client.get(f"/v1/stores/{STORE}/changes", headers=headers)).status_code == 200
    assert trio.current_time() - start < 0.2


@pytest.mark.parametrize("body", [{"kind": "explode"}, {"status": 200}, {"status": 503, "count": 0},
                                  {"kind": "latency", "delay_s": -1}, {"status": 503, "path": "/_sim/events"},
                                  {"status": 503, "method": "get"}, {"status": 503, "typo": 1}])
async def test_bad_fault_rules_are_refused(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    r = await client.post("/_sim/faults", json=body)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_body")
    assert (await client.get("/_sim/faults")).json() == {"faults": []}


# -- heartbeat, support, media, orders ---------------------------------------------------------


def heartbeat_body(**extra: Any) -> dict[str, Any]:
    return {"firmware": "0.1.0", "uptime_s": 12.5, "at": "2025-03-01T09:30:00Z", "appliance_id": "box-1",
            "health": {"status": "warn", "checks": [{"name": "wan.api", "status": "ok", "message": "fine"}]},
            "queues": {"events_pending": 3, "outbox_pending": 0}, "sync": {"cursor": "25"}, **extra}


async def test_heartbeat_is_stored_and_answers_the_server_time(client: httpx.AsyncClient) -> None:
    headers = await authed(client)
    r = await client.post(f"/v1/stores/{STORE}/heartbeat", json=heartbeat_body(), headers=headers)
    assert r.status_code == 200 and r.json()["server_time"].endswith("Z")
    beats = (await client.get("/_sim/heartbeats")).json()
    assert beats["count"] == 1 and beats["heartbeats"][0]["body"]["queues"]["events_pending"] == 3
    assert beats["heartbeats"][0]["appliance_id"] == "box-1"


@pytest.mark.parametrize("body", [
    {k: v for k, v in heartbeat_body().items() if k != "queues"},
    heartbeat_body(queues={"events_pending": -1}),
    heartbeat_body(health={"status": "great"}),
    heartbeat_body(uptime_s="12"),
    heartbeat_body(appliance_id="box-2"),
    heartbeat_body(surprise=True),
])
async def test_bad_heartbeats_are_refused_and_not_stored(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    headers = await authed(client)
    r = await client.post(f"/v1/stores/{STORE}/heartbeat", json=body, headers=headers)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_body")
    assert (await client.get("/_sim/heartbeats")).json()["count"] == 0


async def test_support_replies_are_stored_once_per_request(client: httpx.AsyncClient) -> None:
    headers = await authed(client, "box-1")
    url = "/v1/appliances/box-1/support/req-42"
    r = await client.post(url, json={"status": "ok", "body": {"uptime": 5}}, headers=headers)
    assert r.json() == {"received": True}
    r = await client.post(url, json={"status": "ok", "body": {"uptime": 6}}, headers=headers)
    assert r.status_code == 200
    replies = (await client.get("/_sim/support")).json()
    assert replies["count"] == 1 and replies["replies"]["req-42"]["body"]["body"] == {"uptime": 5}
    r = await client.post("/v1/appliances/box-9/support/req-43", json={}, headers=headers)
    assert (r.status_code, r.json()["error"]) == (403, "forbidden")
    r = await client.post(url, json=["list"], headers=headers)
    assert r.status_code == 400


async def test_media_urls_serve_their_bytes_with_etag_and_range(sim: SimHandle,
                                                                client: httpx.AsyncClient) -> None:
    record = sim.state.get("media", "products/SKU-000001.jpg")
    assert record is not None
    r = await client.get(record["url"])
    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == record["sha256"]
    assert len(r.content) == record["size"]
    r2 = await client.get(record["url"], headers={"Range": "bytes=10-19", "If-Match": r.headers["ETag"]})
    assert r2.status_code == 206 and r2.content == r.content[10:20]
    assert (await client.get(record["url"], headers={"If-None-Match": r.headers["ETag"]})).status_code == 304
    assert (await client.get(record["url"], headers={"If-Match": '"other"'})).status_code == 412
    assert (await client.get(record["url"], headers={"Range": "bytes=99999-"})).status_code == 416
    sim.state.put_media("banners/spring.png", b"spring" * 100)
    assert (await client.get(f"/blob/{STORE}/banners/spring.png")).content == b"spring" * 100
    sim.state.delete("media", "products/SKU-000002.jpg")
    assert (await client.get(f"/blob/{STORE}/products/SKU-000002.jpg")).status_code == 404


async def test_online_orders_go_to_the_injected_sender(nursery: trio.Nursery, tmp_path: Path) -> None:
    sent: list[OrderMessage] = []

    async def send_order(order: OrderMessage) -> None:
        sent.append(order)

    sim = await nursery.start(partial(run_cloud_simulator, SimConfig(products=5, tls_dir=str(tmp_path)),
                                      send_order=send_order))
    async with httpx.AsyncClient(base_url=sim.url, verify=sim.ssl_context()) as client:
        r = await client.post("/_sim/orders", json={"count": 3})
        assert r.json() == {"sent": 3, "order_ids": ["web-000001", "web-000002", "web-000003"]}
        assert (await client.post("/_sim/orders", json={"count": 0})).status_code == 400
    assert [o.order_id for o in sent] == ["web-000001", "web-000002", "web-000003"]
    body = sent[0].body
    assert body["total_cents"] == sum(line["qty"] * line["unit_price_cents"] for line in body["lines"])
    assert all(line["sku"].startswith("SKU-") for line in body["lines"])


async def test_orders_without_a_sender_are_refused(client: httpx.AsyncClient) -> None:
    r = await client.post("/_sim/orders", json={"count": 1})
    assert (r.status_code, r.json()["error"]) == (409, "no_order_sink")


async def test_the_certificate_names_the_production_host(sim: SimHandle) -> None:
    # Connect to loopback but verify the certificate as api.server.commerce-hub.io, as a
    # client does through a CONNECT proxy that maps the name to loopback.
    raw = await trio.open_tcp_stream("127.0.0.1", sim.port)
    tls = trio.SSLStream(raw, sim.ssl_context(), server_hostname="api.server.commerce-hub.io")
    await tls.do_handshake()
    await tls.aclose()
    bad = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", sim.port), sim.ssl_context(),
                         server_hostname="evil.example")
    with pytest.raises(trio.BrokenResourceError):
        await bad.do_handshake()
    await bad.aclose()


async def test_the_ca_is_reused_across_restarts(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        first = await nursery.start(run_cloud_simulator, SimConfig(tls_dir=str(tmp_path)))
        ca1 = first.ca_path.read_bytes()
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        second = await nursery.start(run_cloud_simulator, SimConfig(tls_dir=str(tmp_path)))
        assert second.ca_path.read_bytes() == ca1
        async with httpx.AsyncClient(verify=second.ssl_context()) as client:
            assert (await client.get(second.url + "/_sim/faults")).status_code == 200
        nursery.cancel_scope.cancel()
    assert oct((tmp_path / "ca.key").stat().st_mode & 0o777) == "0o600"


# -- the CLI -----------------------------------------------------------------------------------


async def test_cli_prints_its_ready_line_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "appliance", "devkit", "cloud", "--port", "0", "--products", "3",
           "--tls-dir", str(tmp_path), "--store", "store-9", "--pair-code", "CODE-9", "--retention", "50"]
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(partial(trio.run_process, cmd, stdout=subprocess.PIPE,
                                                         stderr=subprocess.DEVNULL, check=False))
        ready = await _ready_line(proc)
        assert ready["store_id"] == "store-9" and ready["pair_code"] == "CODE-9"
        assert Path(ready["ca"]) == tmp_path / "ca.pem"
        import ssl
        async with httpx.AsyncClient(base_url=ready["url"], verify=ssl.create_default_context(cafile=ready["ca"]),
                                     trust_env=False) as client:
            r = await client.post("/v1/appliances/pair", json={"code": "CODE-9", "appliance_id": "b",
                                                                "firmware": "1"})
            assert r.status_code == 200 and r.json()["store_id"] == "store-9"
            summary = (await client.get("/_sim/catalog")).json()
            assert summary["count"] == 17
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            code = await proc.wait()
        assert code == 0


def test_cli_reports_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "appliance", "devkit", "cloud", "--port", str(port),
                                 "--tls-dir", str(tmp_path)], capture_output=True, text=True, timeout=60,
                                check=False, env={**os.environ})
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert result.stdout == ""


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def _ready_line(proc: trio.Process) -> dict[str, Any]:
    assert proc.stdout is not None
    buffer = b""
    with trio.fail_after(30):
        while b"\n" not in buffer:
            chunk = await proc.stdout.receive_some()
            assert chunk, "the simulator exited before its ready line"
            buffer += chunk
    ready: dict[str, Any] = json.loads(buffer.split(b"\n")[0])
    return ready


@pytest.mark.slow
async def test_snapshot_of_100000_products_streams_in_bounded_memory(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "appliance", "devkit", "cloud", "--products", "100000", "--tls-dir", str(tmp_path)]
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(partial(trio.run_process, cmd, stdout=subprocess.PIPE,
                                                         stderr=subprocess.DEVNULL, check=False))
        ready = await _ready_line(proc)
        before = _peak_rss_mb(proc.pid)
        import ssl
        async with httpx.AsyncClient(base_url=ready["url"], verify=ssl.create_default_context(cafile=ready["ca"]),
                                     trust_env=False, timeout=60) as client:
            headers = await authed(client)
            lines = 0
            tail = b""
            async with client.stream("GET", f"/v1/stores/{STORE}/snapshot", headers=headers) as resp:
                async for chunk in resp.aiter_raw():
                    lines += chunk.count(b"\n")
                    tail = (tail + chunk)[-200:]
        assert lines == 400_006
        assert json.loads(tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]) == {"cursor": "400005", "count": 400_005}
        # The body is about 67 MB; the server's peak memory must not grow with it.
        growth = _peak_rss_mb(proc.pid) - before
        assert growth < 20, f"the simulator grew by {growth:.0f} MB while streaming"
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await proc.wait() == 0


# -- pure parts, with hypothesis ---------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)
ids = st.from_regex(r"[A-Za-z0-9._:-]{1,40}", fullmatch=True)


@given(st.binary(max_size=300))
def test_parse_events_on_any_bytes_parses_or_refuses_cleanly(raw: bytes) -> None:
    try:
        outcomes = parse_events(raw)
    except CloudApiError as exc:
        assert exc.status == 400 and exc.error == "invalid_body"
    else:
        assert all(isinstance(o, Event | Rejection) for o in outcomes)


@given(json_values)
def test_parse_events_on_any_json_parses_or_refuses_cleanly(value: Any) -> None:
    for raw in (json.dumps(value).encode(), json.dumps({"events": value}).encode(),
                json.dumps({"events": [value]}).encode()):
        try:
            parse_events(raw)
        except CloudApiError as exc:
            assert exc.status == 400


@given(st.dictionaries(st.sampled_from(["id", "type", "at", "data", "x"]), json_values, max_size=5))
def test_validate_event_never_raises(value: dict[str, Any]) -> None:
    outcome = validate_event(value, 3)
    assert outcome.index == 3
    if isinstance(outcome, Rejection):
        assert outcome.reason


valid_events = st.one_of(
    st.builds(lambda i, qty, price: {"id": i, "type": "sale", "at": "2025-03-01T09:30:00Z", "data": {
        "device_id": "d", "currency": "EUR", "total_cents": qty * price,
        "lines": [{"sku": "S", "qty": qty, "unit_price_cents": price}]}},
        ids, st.integers(1, 50) | st.integers(-50, -1), st.integers(0, 10**6)),
    st.builds(lambda i, s: {"id": i, "type": "order.status", "at": "2025-03-01T09:30:00+02:00",
                            "data": {"order_id": "o", "status": s}},
              ids, st.sampled_from(["received", "ready", "cancelled"])),
    st.builds(lambda i, s: {"id": i, "type": "device.status", "at": "2025-03-01T09:30:00Z",
                            "data": {"device_id": "d", "status": s}},
              ids, st.sampled_from(["online", "offline", "degraded"])))


@given(st.lists(valid_events, max_size=10))
def test_valid_events_are_accepted_and_round_trip(events: list[dict[str, Any]]) -> None:
    outcomes = parse_events(json.dumps({"events": events}).encode())
    assert [o.as_json() for o in outcomes if isinstance(o, Event)] == events


@given(json_values)
def test_other_parsers_parse_or_refuse_cleanly(value: Any) -> None:
    raw = json.dumps(value).encode()
    for parser in (parse_pair, parse_heartbeat, parse_mutation, parse_fault):
        try:
            parser(raw)
        except CloudApiError as exc:
            assert exc.status == 400


@given(st.text(max_size=30))
def test_cursor_and_limit_parse_or_refuse(text: str) -> None:
    for parser, error in ((parse_cursor, "invalid_cursor"), (parse_limit, "invalid_limit")):
        try:
            value = parser(text)
        except CloudApiError as exc:
            assert (exc.status, exc.error) == (400, error)
        else:
            assert str(value) == text.lstrip("0") or (value == 0 and set(text) == {"0"})


mutations = st.lists(st.tuples(
    st.sampled_from(["product", "price", "stock", "media", "device"]),
    st.sampled_from(["SKU-000001", "SKU-000003", "NEW-1", "dev-pos-1", "products/SKU-000002.jpg"]),
    st.none() | st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 3), max_size=2)), max_size=30)


@settings(max_examples=60, deadline=None)
@given(mutations, st.integers(1, 40), st.integers(1, 9))
def test_snapshot_plus_feed_always_equals_the_live_catalog(ops: list[tuple[str, str, dict[str, Any] | None]],
                                                           retention: int, limit: int) -> None:
    state = CloudState(SimConfig(products=3, retention=retention), url="https://sim")
    half = len(ops) // 2
    state.mutate(ops[:half])
    cursor, records = state.snapshot()
    # The catalog changes while the snapshot is read: it must stay as of its cursor.
    replica: Replica = {}
    for i, record in enumerate(records):
        replica[(record.entity, record.key)] = record.data
        if i == 0:
            state.mutate(ops[half:])
    # Exactly the catalog as of the cursor: a platform that saw only the first half.
    reference = CloudState(SimConfig(products=3, retention=retention), url="https://sim")
    reference.mutate(ops[:half])
    assert digest(replica) == reference.summary()["digest"] and reference.cursor == cursor
    position = int(cursor)
    if position < state.oldest_cursor:
        with pytest.raises(CloudApiError) as info:
            state.changes(position, limit)
        assert info.value.status == 410
        return
    while True:
        page = state.changes(position, limit)
        apply(replica, page["changes"])
        assert [c["seq"] for c in page["changes"]] == list(range(position + 1, int(page["cursor"]) + 1))
        position = int(page["cursor"])
        if not page["more"]:
            break
    assert digest(replica) == state.summary()["digest"]

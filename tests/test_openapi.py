"""The store API's published contract: ``GET /v1/openapi.json`` (docs/store-api.md).

A whole appliance runs in the test's loop (real hypercorn on loopback, real SQLite). The
document is checked by openapi-spec-validator, covers every route of the listener, and
comes from the same body definitions that validate and encode: a test changes only a
body definition and sees all three change.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from starlette.routing import Route

from appliance.protocol import store_api
from appliance.protocol.bodies import Range, schema_components
from appliance.protocol.channel_codec import ChannelProtocolError, check_command_id, check_kind
from appliance.protocol.openapi import markdown, openapi_path
from appliance.protocol.store_api import CommandRequest
from appliance.services.assembly import listener_apps, web_parts
from appliance.services.runtime import Runtime
from appliance.services.web import store
from appliance.services.web.admin import OPENAPI_PATH as ADMIN_OPENAPI_PATH
from appliance.services.web.api import OPENAPI_PATH
from appliance.services.web.common import service_app
from appliance.storage.catalog import ReplicaWrite, apply_changes
from appliance.storage.devices import AdoptionState, new_pending, set_state
from tests.sync_helpers import ADMIN, StartBox, api_client

pytest_plugins = ["tests.sync_fixtures"]

SALE: dict[str, Any] = {
    "id": "s1", "device_id": "pos-1", "currency": "EUR", "total_cents": 698,
    "lines": [{"sku": "SKU-000007", "qty": 2, "unit_price_cents": 349}],
}


@pytest.fixture
async def box(start_box: StartBox) -> Runtime:
    return await start_box()


@pytest.fixture
async def api(box: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(box) as client:
        yield client


async def served(api: httpx.AsyncClient) -> dict[str, Any]:
    answer = await api.get(OPENAPI_PATH, headers={"Authorization": ""})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    doc: dict[str, Any] = answer.json()
    return doc


async def test_the_served_document_is_valid_openapi_3_1(api: httpx.AsyncClient) -> None:
    doc = await served(api)
    validate(doc)  # raises on any departure from the OpenAPI 3.1 schema
    assert doc["openapi"] == "3.1.0"
    assert set(doc["components"]["securitySchemes"]) == {"admin", "device"}
    # Every error answer has the one error shape.
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for status, reply in op["responses"].items():
                if int(status) >= 400:
                    schema = reply["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)


async def test_every_route_of_the_listener_is_in_the_document(box: Runtime, api: httpx.AsyncClient) -> None:
    doc = await served(api)
    routes = {(method.lower(), openapi_path(r.path)) for r in web_parts()["api"].routes_for(box)
              if isinstance(r, Route) for method in r.methods or () if method != "HEAD"}
    documented = {(method, path) for path, item in doc["paths"].items() for method in item}
    assert routes <= documented, routes - documented
    assert documented - routes == {("get", "/healthz"), ("get", OPENAPI_PATH)}


async def test_the_admin_json_routes_have_their_own_valid_document(box: Runtime) -> None:
    async with api_client(box, "admin") as admin:
        answer = await admin.get(ADMIN_OPENAPI_PATH, headers={"Authorization": ""})
    assert answer.status_code == 200
    doc = answer.json()
    validate(doc)
    listener = box_app_routes(box, "admin")
    json_routes = {(m, p) for m, p in listener if p.startswith("/api/")}
    documented = {(method, path) for path, item in doc["paths"].items() for method in item}
    assert json_routes == documented, json_routes ^ documented
    assert {"/api/status", "/api/devices", "/api/settings", "/api/pairing", "/api/support-channel"} <= set(doc["paths"])


def box_app_routes(box: Runtime, role: str) -> set[tuple[str, str]]:
    """Every (method, OpenAPI path) the listener's app serves."""
    app = listener_apps(box)[role]
    return {(method.lower(), openapi_path(r.path)) for r in app.routes
            if isinstance(r, Route) for method in r.methods or () if method != "HEAD"}


async def test_a_sales_rules_are_in_its_schema(api: httpx.AsyncClient) -> None:
    sale = (await served(api))["components"]["schemas"]["Sale"]
    assert sale["additionalProperties"] is False
    assert set(sale["required"]) == {"id", "device_id", "currency", "total_cents", "lines"}
    assert sale["properties"]["lines"]["minItems"] == 1 and sale["properties"]["lines"]["maxItems"] == 500
    assert sale["properties"]["currency"]["pattern"] == "^(?:[A-Z]{3})$"
    line = (await served(api))["components"]["schemas"]["SaleLine"]["properties"]["qty"]
    assert line == {"type": "integer", "minimum": -1_000_000, "maximum": 1_000_000, "not": {"const": 0}}


# --- one definition: validation, encoding and schema change together ------------------------------


class Sale(store_api.Sale, frozen=True):
    """A sale that may carry a tip (the only change: one more field, with its rule)."""

    tip_cents: Annotated[int, Range(0, 500)] = 0


class SaleAnswer(store_api.SaleAnswer, frozen=True):
    sale: Sale


@pytest.mark.parametrize("tip", [False, True])
async def test_changing_a_body_definition_changes_validation_encoding_and_schema(
        start_box: StartBox, monkeypatch: pytest.MonkeyPatch, tip: bool) -> None:
    if tip:
        for module in (store_api, store):
            monkeypatch.setattr(module, "Sale", Sale)
            monkeypatch.setattr(module, "SaleAnswer", SaleAnswer)
    box = await start_box()
    async with api_client(box) as api:
        schema = (await served(api))["components"]["schemas"]["Sale"]["properties"]
        too_much = await api.post("/v1/sales", json={**SALE, "tip_cents": 600})
        taken = await api.post("/v1/sales", json={**SALE, "tip_cents": 100})
        stored = await api.get("/v1/sales/s1")
    assert too_much.status_code == 422
    if not tip:
        assert "tip_cents" not in schema
        assert too_much.json()["errors"] == ["(body): unknown field(s) tip_cents"]
        assert taken.status_code == 422 and stored.status_code == 404
        return
    assert schema["tip_cents"] == {"type": "integer", "default": 0, "minimum": 0, "maximum": 500}
    assert too_much.json()["errors"] == ["tip_cents: must be between 0 and 500, got 600"]
    assert taken.status_code == 201, taken.text
    assert taken.json()["sale"]["tip_cents"] == 100 and stored.json()["sale"]["tip_cents"] == 100
    # The encoding leaves a field at its default out, as for every body.
    assert "tip_cents" not in store_api.canonical(store_api.parse_sale(SALE))


# --- docs/store-api.md -------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[1] / "docs"
MARK = "<!-- Generated from GET "


@pytest.mark.parametrize(("page", "role", "path"), [("store-api.md", "api", OPENAPI_PATH),
                                                   ("admin-api.md", "admin", ADMIN_OPENAPI_PATH)])
async def test_docs_pages_are_the_served_documents(box: Runtime, page: str, role: str, path: str) -> None:
    doc_path = DOCS / page
    text = doc_path.read_text("utf-8")
    head, mark, rest = text.partition(MARK)
    assert mark, f"{doc_path} has lost its marker line"
    async with api_client(box, role) as client:
        served_doc = (await client.get(path)).json()
    expected = head + mark + rest.partition("\n")[0] + "\n\n" + markdown(served_doc)
    if os.environ.get("WRITE_DOCS") == "1":
        doc_path.write_text(expected, "utf-8")
    assert text == expected, f"docs/{page} differs from the served document: run WRITE_DOCS=1 .venv/bin/pytest " \
                             "tests/test_openapi.py -k docs and commit the result"


# --- schemathesis against the running box --------------------------------------------------

# Examples per route in the default run (scripts/fuzz-api runs many more).
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "8"))
FUZZ_CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


async def fuzz_box(start_box: StartBox) -> Runtime:
    """A box with something to find: a small catalog, an adopted device, a sale."""
    box = await start_box()
    writes = [ReplicaWrite(entity=entity, key=f"SKU-{i:06d}", name=f"Product {i}" if entity == "product" else "",
                           seq=i, data=json.dumps(data))
              for i in range(1, 6)
              for entity, data in (("product", {"sku": f"SKU-{i:06d}", "name": f"Product {i}", "active": True}),
                                   ("price", {"sku": f"SKU-{i:06d}", "amount_cents": 100 * i, "currency": "EUR"}),
                                   ("stock", {"sku": f"SKU-{i:06d}", "qty": i}))]

    def fill(conn: sqlite3.Connection) -> None:
        apply_changes(conn, writes, cursor="9", now=1.0)
        new_pending(conn, device_id="pos-1", kind="pos", name="till", address="127.0.0.1", port=1, now=1.0)
        set_state(conn, "pos-1", AdoptionState.ADOPTED, 1.0)

    await box.db.write(fill)
    async with api_client(box) as api:
        assert (await api.post("/v1/sales", json=SALE)).status_code == 201
    return box


async def run_schemathesis(box: Runtime, examples: int, report: Path, *, role: str = "api",
                           path: str = OPENAPI_PATH, extra: tuple[str, ...] = ()) -> tuple[int, str]:
    """The schemathesis CLI in its own process against one of the box's listeners, as the admin."""
    url = f"http://127.0.0.1:{box.ports[role]}{path}"
    argv = [str(Path(sys.executable).with_name("schemathesis")), "run", url, "--checks", FUZZ_CHECKS,
            "--max-examples", str(examples), "--workers", "1", "--seed", "18", "-H", f"Authorization: Bearer {ADMIN}",
            "--request-timeout", "10", "--suppress-health-check", "all", "--no-color",
            "--report", "junit", "--report-junit-path", str(report), *extra]
    # In its own directory: it keeps a cache of what it found where it runs.
    done = await trio.run_process(argv, capture_stdout=True, stderr=subprocess.STDOUT, check=False,
                                  cwd=report.parent)
    return done.returncode, done.stdout.decode("utf-8", "replace")


async def test_schemathesis_finds_no_5xx_and_no_departure_from_the_document(
        start_box: StartBox, tmp_path: Path) -> None:
    box = await fuzz_box(start_box)
    code, out = await run_schemathesis(box, FUZZ_EXAMPLES, tmp_path / "junit.xml")
    print(out)
    assert code == 0, out
    assert re.search(r"\d+ generated, \d+ passed", out), out


async def test_schemathesis_on_the_admin_json_routes(start_box: StartBox, tmp_path: Path) -> None:
    box = await fuzz_box(start_box)
    # POST /api/pairing asks the platform, which no test box reaches: its answer is the
    # documented 502 every time, which not_a_server_error would count.
    code, out = await run_schemathesis(box, FUZZ_EXAMPLES, tmp_path / "junit.xml", role="admin",
                                       path=ADMIN_OPENAPI_PATH, extra=("--exclude-path", "/api/pairing"))
    print(out)
    assert code == 0, out
    assert re.search(r"\d+ generated, \d+ passed", out), out


DEEP = "[" * 100_000 + "]" * 100_000
HUGE = "9" * 5000
HOSTILE = [
    ("GET", "/v1/products?limit=" + HUGE, None),
    ("GET", "/v1/products?limit=\u00b2", None),
    ("GET", "/v1/products?limit=-1", None),
    ("GET", "/v1/products?limit=1e3", None),
    ("GET", "/v1/products?after=" + "A" * 5000, None),
    ("GET", "/v1/orders?limit=" + HUGE, None),
    ("GET", "/v1/orders?limit=\u00b2", None),
    ("GET", "/v1/orders?limit=\u0663", None),
    ("GET", "/v1/devices/pos-1/commands?limit=" + HUGE, None),
    ("GET", "/v1/devices/pos-1/commands?limit=\u00b2", None),
    ("GET", "/v1/devices/pos-1/commands?limit=\u0663", None),
    ("POST", "/v1/sales", DEEP),
    ("POST", "/v1/sales", '{"id": "x", "total_cents": ' + HUGE + "}"),
    ("POST", "/v1/sales", '{"id": "x", "total_cents": 1e999}'),
    ("POST", "/v1/sales", '{"id": "x", "total_cents": NaN}'),
    ("POST", "/v1/orders", '{"lines": ' + DEEP + "}"),
    ("POST", "/v1/devices/pos-1/commands", '{"kind": "ping", "body": {"a": ' + DEEP + "}}"),
    ("POST", "/v1/devices/pos-1/commands", '{"kind": "ping", "body": {}, "expires_at": ' + HUGE + "}"),
    ("POST", "/v1/devices/pos-1/commands", '{"kind": "ping", "body": {}, "expires_at": 1e999}'),
    ("POST", "/v1/devices/pos-1/commands", '{"kind": "ping", "body": {"n": ' + HUGE + "}}"),
    ("POST", "/v1/commands", '{"commands": [{"device_id": "pos-1", "kind": "ping", "body": ' + DEEP + "}]}"),
    ("POST", "/v1/commands", '{"commands": [{"device_id": "pos-1", "kind": "ping", "body": {}, "expires_at": '
     + HUGE + "}]}"),
    ("POST", "/v1/commands", '{"commands": [{"device_id": "pos-1", "kind": "ping", "body": {"n": ' + HUGE + "}}]}"),
    ("POST", "/v1/commands", '{"commands": {}}'),
    ("POST", "/v1/commands", '{"commands": [1]}'),
]


async def test_hostile_inputs_get_a_4xx_never_a_5xx(start_box: StartBox) -> None:
    """What a hostile client tries first: deep nesting, 5,000-digit numbers, odd limits."""
    box = await fuzz_box(start_box)
    bad = []
    async with api_client(box) as api:
        for method, url, body in HOSTILE:
            answer = await api.request(method, url, content=body, headers={"Content-Type": "application/json"})
            if not 400 <= answer.status_code < 500 or "error" not in answer.json():
                bad.append(f"{method} {url[:60]} {(body or '')[:60]}: {answer.status_code} {answer.text[:200]}")
    assert not bad, "\n".join(bad)


# --- commands: the documented rules are the channel's ---------------------------------------------

names = st.text(alphabet="abz019._:-AZ \n", max_size=70) | st.from_regex(r"[a-z][a-z0-9_.]{0,70}", fullmatch=True)


@given(names)
@settings(max_examples=300)
def test_the_documented_command_rules_are_the_channels(value: str) -> None:
    props = schema_components([CommandRequest])["CommandRequest"]["properties"]
    for field, check in (("kind", check_kind), ("id", check_command_id)):
        rule = props[field]
        # ECMA-262's "$" is the end of the text; Python's also matches before a final newline.
        pattern = rule["pattern"].removesuffix("$") + r"\Z"
        documented = re.search(pattern, value) is not None and len(value) <= rule.get("maxLength", 10**9)
        try:
            check(value)
        except ChannelProtocolError:
            accepted = False
        else:
            accepted = True
        assert documented == accepted, (field, value)


# --- the catalog reads' way around the router gives the router's answers ---------------------------


CATALOG_URLS = ["/v1/products/SKU-000001", "/v1/prices/SKU-000002", "/v1/stock/SKU-000003", "/v1/products/NOPE",
                "/v1/products/a%2Fb", "/v1/stock/\u00e9"]


async def test_catalog_reads_answer_as_the_router_does(start_box: StartBox) -> None:
    box = await fuzz_box(start_box)
    router_only = service_app("api", box, store.routes(box))  # no CatalogReads in front
    async with api_client(box) as fast, httpx.AsyncClient(transport=httpx.ASGITransport(app=router_only),
                                                          base_url="http://127.0.0.1") as slow:
        for url in CATALOG_URLS:
            for auth in (f"Bearer {ADMIN}", "Bearer wrong", ""):
                headers = {"Authorization": auth}  # replaces the admin token the api client sends by default
                a = await fast.get(url, headers=headers)
                b = await slow.get(url, headers=headers)
                assert (a.status_code, a.json(), a.headers["content-type"], a.headers.get("www-authenticate")) == \
                    (b.status_code, b.json(), b.headers["content-type"], b.headers.get("www-authenticate")), (url, auth)
    statuses = {(await fast_status(box, url)) for url in CATALOG_URLS}
    assert statuses == {200, 404}  # both kinds of answer were compared


async def fast_status(box: Runtime, url: str) -> int:
    async with api_client(box) as api:
        return (await api.get(url)).status_code

"""The store API's published contract: ``GET /v1/openapi.json`` (docs/store-api.md).

A whole appliance runs in the test's loop (real hypercorn on loopback, real SQLite). The
document is checked by openapi-spec-validator, covers every route of the listener, and
comes from the same body definitions that validate and encode: a test changes only a
body definition and sees all three change.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from openapi_spec_validator import validate
from starlette.routing import Route

from appliance.protocol import store_api
from appliance.protocol.bodies import Range
from appliance.protocol.openapi import markdown, openapi_path
from appliance.services.assembly import web_parts
from appliance.services.runtime import Runtime
from appliance.services.web import store
from appliance.services.web.api import OPENAPI_PATH
from tests.sync_helpers import StartBox, api_client

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

DOC = Path(__file__).resolve().parents[1] / "docs" / "store-api.md"
MARK = "<!-- Generated from GET /v1/openapi.json"


async def test_docs_store_api_md_is_the_served_document(api: httpx.AsyncClient) -> None:
    text = DOC.read_text("utf-8")
    head, mark, rest = text.partition(MARK)
    assert mark, f"{DOC} has lost its marker line"
    expected = head + mark + rest.partition("\n")[0] + "\n\n" + markdown(await served(api))
    if os.environ.get("WRITE_DOCS") == "1":
        DOC.write_text(expected, "utf-8")
    assert text == expected, "docs/store-api.md differs from the served document: run WRITE_DOCS=1 .venv/bin/pytest " \
                             "tests/test_openapi.py -k docs and commit the result"

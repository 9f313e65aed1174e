"""Routes that carry their OpenAPI operation, bodies encoded from their definition, and the
document route of a listener (``GET /v1/openapi.json`` on the store API, docs/store-api.md).

A route of a documented listener is a :class:`Documented` route: the Starlette route and
its :class:`~appliance.protocol.openapi.Operation` in one object, so a route cannot exist
without its entry in the document (``tests/test_openapi.py`` checks every route of the
listener has one). The document is built once, when the app is made, from the routes and
the body definitions; it is served as bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from appliance import __version__
from appliance.protocol.openapi import Operation, Param, Reply, document
from appliance.protocol.store_api import Error

__all__ = ["ADMIN", "DEVICE", "SECURITY_SCHEMES", "BodyResponse", "Documented", "document_of", "errors",
           "healthz_operation", "openapi_route", "path_param"]

ADMIN: Final = "admin"
DEVICE: Final = "device"
SECURITY_SCHEMES: Final[Mapping[str, Mapping[str, Any]]] = {
    ADMIN: {"type": "http", "scheme": "bearer",
            "description": "The box's admin token (shown on the first-start ticket and the homepage's settings)."},
    DEVICE: {"type": "apiKey", "in": "header", "name": "Signature",
             "description": "A request signed with the adopted device's own key: the Signature and "
                            "Signature-Input headers of RFC 9421, as docs/device-api.md profiles them."},
}
_ERROR_WORDS: Final = {
    400: "the request is not valid (the errors name each problem by its path)",
    401: "no valid credential",
    403: "the credential may not do this",
    404: "not on this box",
    408: "the body did not arrive in time",
    409: "conflicts with what the box holds",
    413: "the body is too large",
    415: "the body is not of the type this route takes",
    422: "the body is not a valid record (the errors name each problem by its path)",
    429: "too many requests from this device; try again shortly",
    503: "not ready yet",
    507: "not enough room on the box",
}


def errors(*statuses: int, **words: str) -> tuple[Reply, ...]:
    """Error answers (the :class:`~appliance.protocol.store_api.Error` body); ``words``
    (``e404="no such product"``) replaces the default meaning of a status."""
    return tuple(Reply(status=s, description=words.get(f"e{s}", _ERROR_WORDS[s]), body=Error) for s in statuses)


def path_param(name: str, description: str, **schema: Any) -> Param:
    return Param(name=name, where="path", description=description,
                 schema={"type": "string", "minLength": 1, **schema}, required=True)


class Documented(Route):
    """A route with one method and its OpenAPI operation."""

    def __init__(self, path: str, endpoint: Callable[..., Any], *, method: str, operation: Operation) -> None:
        super().__init__(path, endpoint, methods=[method])
        self.method = method
        self.operation = operation


class BodyResponse(Response):
    """A body encoded from its definition (msgspec), fields left at their default left out."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return msgspec.json.encode(content)


def healthz_operation(service: str) -> Operation:
    return Operation(summary=f"Whether the {service} listener answers", tag="health",
                     replies=(Reply(status=200, description="it answers: {service, status, version}"),))


def document_of(routes: Iterable[BaseRoute], *, title: str, description: str,
                extra: Sequence[tuple[str, str, Operation]] = ()) -> dict[str, Any]:
    """The OpenAPI document of the documented routes among ``routes``, plus ``extra``."""
    ops = [(r.method, r.path, r.operation) for r in routes if isinstance(r, Documented)]
    return document(title=title, version=__version__, description=description, operations=[*ops, *extra],
                    security_schemes=SECURITY_SCHEMES)


def openapi_route(path: str, doc: dict[str, Any]) -> Documented:
    """``GET path``: ``doc`` as JSON, built once."""
    op = Operation(summary="This document (OpenAPI 3.1)", tag="contract",
                   replies=(Reply(status=200, description="the OpenAPI document of this listener's routes"),))
    doc["paths"][path] = {"get": {"summary": op.summary, "operationId": "get_openapi", "tags": ["contract"],
                                  "security": [{}],
                                  "responses": {"200": {"description": op.replies[0].description,
                                                        "content": {"application/json": {"schema": {
                                                            "type": "object"}}}}}}}
    doc["paths"] = dict(sorted(doc["paths"].items()))
    raw = json.dumps(doc, ensure_ascii=False, indent=1).encode("utf-8")

    async def serve(request: Request) -> Response:
        return Response(raw, media_type="application/json")

    return Documented(path, serve, method="GET", operation=op)

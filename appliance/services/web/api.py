"""The store API listener (port 8000): catalog, prices, stock, sales and orders in (JSON).

Feature routes live in their own modules and come in through
:class:`~appliance.services.web.parts.WebParts`, assembled in ``appliance.services.assembly``.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from appliance.services.runtime import Runtime
from appliance.services.web.common import service_app
from appliance.services.web.contract import document_of, healthz_operation, openapi_route
from appliance.services.web.parts import Front, WebParts

__all__ = ["DESCRIPTION", "OPENAPI_PATH", "create_app"]

OPENAPI_PATH = "/v1/openapi.json"
DESCRIPTION = ("The store appliance's store API (port 8000): the local copy of the catalog, prices and stock, "
               "sales and orders in (durable before the answer, then uploaded), and device commands. "
               "Devices sign each request with their own key (docs/device-api.md); back-office tools may use "
               "the admin token. Errors are JSON {error, errors}; see docs/store-api.md.")


def create_app(runtime: Runtime, parts: WebParts) -> Starlette:
    routes = parts.routes_for(runtime)
    # Built once, from the routes' operations and their bodies' definitions.
    doc = document_of(routes, title="Store appliance: store API", description=DESCRIPTION,
                      extra=[("GET", "/healthz", healthz_operation("store API"))])
    app = service_app("api", runtime, [*routes, openapi_route(OPENAPI_PATH, doc)],
                      cls=_StoreApi)
    assert isinstance(app, _StoreApi)
    app.front = tuple(make(runtime) for make in parts.front)  # the catalog reads' way around the framework
    return app


class _StoreApi(Starlette):
    """The store API's Starlette app, whose :data:`front` handlers are asked first: a request
    one of them answers never enters Starlette's middleware (error, CORS) or router."""

    front: Sequence[Front] = ()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self  # as Starlette sets it (a request's app.state holds the runtime)
        for answer in self.front:
            if await answer(scope, receive, send):
                return
        await super().__call__(scope, receive, send)

"""The store API listener (port 8000): catalog, prices, stock, sales and orders in (JSON).

Feature routes live in their own modules and come in through
:class:`~appliance.services.web.parts.WebParts`, assembled in ``appliance.services.assembly``.
"""

from __future__ import annotations

from starlette.applications import Starlette

from appliance.services.runtime import Runtime
from appliance.services.web.common import service_app
from appliance.services.web.parts import WebParts

__all__ = ["create_app"]


def create_app(runtime: Runtime, parts: WebParts) -> Starlette:
    return service_app("api", runtime, parts.routes_for(runtime))

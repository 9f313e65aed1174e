"""The support listener: support: diagnostics bundle and live log tail.

Only /healthz is served for now; every other path answers a 404 JSON, not a fake feature.
"""

from __future__ import annotations

from starlette.applications import Starlette

from appliance.services.runtime import Runtime
from appliance.services.web.common import service_app
from appliance.services.web.parts import WebParts

__all__ = ["create_app"]


def create_app(runtime: Runtime, parts: WebParts) -> Starlette:
    return service_app("support", runtime, parts.routes_for(runtime))

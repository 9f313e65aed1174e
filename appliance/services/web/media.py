"""The media listener: media: cached images, videos, documents.

Only /healthz is served for now; every other path answers a 404 JSON, not a fake feature.
"""

from __future__ import annotations

from starlette.applications import Starlette

from appliance.services.runtime import Runtime
from appliance.services.web.common import service_app

__all__ = ["create_app"]


def create_app(runtime: Runtime) -> Starlette:
    return service_app("media", runtime)

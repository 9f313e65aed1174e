"""The ops listener (port 8004): /healthz, /readyz, /metrics, /health (the health report).

``GET /health`` answers with results at most a few seconds old (the checks run once at a
time, see ``appliance.health.registry``); ``POST /health`` with the admin bearer token runs
them now.

/readyz answers 503 with its reasons while any core service is not running or any service
has failed; load balancers, systemd's watchdog logic and technicians read the same words.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from appliance.protocol.health import exit_code, summary, worst
from appliance.services.i18n import gettext_for, negotiate
from appliance.services.runtime import Runtime
from appliance.services.web.common import require_admin, service_app
from appliance.services.web.kit import JsonResponse
from appliance.services.web.parts import WebParts

__all__ = ["create_app"]


def create_app(runtime: Runtime, parts: WebParts) -> Starlette:
    async def readyz(request: Request) -> Response:
        reasons = runtime.board.not_ready()
        if reasons:
            return JsonResponse({"ready": False, "reasons": reasons}, status_code=503)
        return JsonResponse({"ready": True, "reasons": []})

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(runtime.metrics.render(), media_type="text/plain; version=0.0.4")

    async def health(request: Request) -> Response:
        if request.method == "POST":  # the admin's forced run; readers get results a few seconds old
            require_admin(request, runtime)
            checks = await runtime.health.refresh()
        else:
            checks = await runtime.health.latest()
        if "accept-language" in request.headers:  # a person's tool (`appliance health`): in their language
            _ = gettext_for(negotiate(request.headers["accept-language"]))
            checks = [c.in_language(_) for c in checks]
        return JsonResponse({
            "status": str(worst(checks)),
            "exit_code": exit_code(checks),
            "summary": summary(checks),
            "checks": [c.as_dict() for c in checks],
        })

    return service_app("ops", runtime, [
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/health", health, methods=["GET", "POST"]),
        *parts.routes_for(runtime),
    ])

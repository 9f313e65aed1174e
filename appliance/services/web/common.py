"""What every listener's app shares: /healthz, JSON errors, bearer auth, bounded bodies.

Errors are JSON ``{"error": message, "errors": [path-named lines]}``; an unknown path is
a 404 JSON, never an HTML page, so a device app can always parse the answer.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from appliance import __version__
from appliance.services.runtime import Runtime

__all__ = ["ApiError", "json_error", "read_json", "require_admin", "service_app"]


class ApiError(Exception):
    """Raised by a handler to answer with a JSON error."""

    def __init__(self, status: int, message: str, errors: Sequence[str] = ()) -> None:
        self.status, self.message, self.errors = status, message, list(errors)
        super().__init__(message)


def json_error(
    status: int, message: str, errors: Sequence[str] = (), headers: dict[str, str] | None = None
) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if errors:
        body["errors"] = list(errors)
    return JSONResponse(body, status_code=status, headers=headers)


def bearer_token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def require_admin(request: Request, runtime: Runtime) -> None:
    """Refuse with 401 unless the request carries the admin bearer token."""
    token = bearer_token(request)
    if token is None or not hmac.compare_digest(token.encode(), runtime.admin_token.encode()):
        raise ApiError(401, "admin bearer token required (Authorization: Bearer <token>)")


async def read_json(request: Request, limit: int) -> Any:
    """The request's JSON body, refusing more than ``limit`` bytes before buffering them."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad Content-Length")
        if int(declared) > limit:
            raise ApiError(413, f"body too large: {declared} bytes, the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"body too large: over the limit of {limit} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}") from exc


def service_app(name: str, runtime: Runtime, routes: Sequence[BaseRoute] = ()) -> Starlette:
    """A Starlette app for listener ``name`` with /healthz and JSON errors."""

    async def healthz(request: Request) -> Response:
        return JSONResponse({"service": name, "status": "ok", "version": __version__})

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return json_error(exc.status, exc.message, exc.errors, headers)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = "not found" if exc.status_code == 404 else str(exc.detail)
        return json_error(exc.status_code, f"{message}: {request.method} {request.url.path} on the {name} service")

    app = Starlette(
        routes=[Route("/healthz", healthz), *routes],
        exception_handlers={ApiError: on_api_error, HTTPException: on_http_error},
    )
    app.state.runtime = runtime
    app.state.service = name
    return app

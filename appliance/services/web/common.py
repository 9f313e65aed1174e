"""What every listener's app shares: /healthz, JSON errors, bearer auth, bounded bodies.

Errors are JSON ``{"error": message, "errors": [path-named lines]}``; an unknown path is
a 404 JSON, never an HTML page, so a device app can always parse the answer.
"""

from __future__ import annotations

import hmac
import json
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Message, Receive, Scope, Send

from appliance import __version__
from appliance.protocol.json_bounds import JsonBoundsError, loads_bounded
from appliance.protocol.text import Number, Text
from appliance.services.h11_serving import BODY_AT_HAND
from appliance.services.runtime import Runtime
from appliance.services.web.kit import JsonResponse

__all__ = ["MAX_FORM_BYTES", "ApiError", "FormError", "bearer_of", "check_form_token", "error_response", "json_error",
           "parse_form", "parse_json", "read_body", "read_form", "read_json", "require_admin", "service_app",
           "whole_number"]

# A homepage form is a token and one action or code: a few hundred bytes. Anything bigger is not ours.
MAX_FORM_BYTES: Final = 4096
MAX_FORM_FIELDS: Final = 8


class ApiError(Exception):
    """Raised by a handler to answer with a JSON error."""

    def __init__(self, status: int, message: str, errors: Sequence[str] = ()) -> None:
        self.status, self.message, self.errors = status, message, list(errors)
        super().__init__(message)


class FormError(Exception):
    """A homepage form that cannot be acted on; the page says ``message`` with ``status``
    (a Text: the page says it in the reader's language)."""

    def __init__(self, status: int, message: str) -> None:
        self.status, self.message = status, message
        super().__init__(message)


async def read_form(request: Request, limit: int = MAX_FORM_BYTES) -> dict[str, str]:
    """A small urlencoded form, refused before buffering when too large or of another type,
    and with 408 when it has not arrived whole within ``[http] body_timeout_s``.

    The homepage has no JavaScript, so its buttons are plain forms that carry the admin
    token as a password field (a browser form cannot send an Authorization header): the
    token can only be checked once this small, time-bounded body is in. ``limit``: a form
    that carries more than a token and an action (a pasted CA) says so."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise FormError(415, Text("Expected an HTML form (application/x-www-form-urlencoded), got {what}.",
                                  what=ctype or Text("nothing")))
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise FormError(413, Text("Form too large (the limit is {limit} bytes).", limit=Number(limit)))
    timeout = _body_timeout_s(request)
    body = b""
    with trio.move_on_after(timeout) as scope:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise FormError(413, Text("Form too large (the limit is {limit} bytes).", limit=Number(limit)))
    if scope.cancelled_caught:
        raise FormError(408, Text("The form did not arrive within {seconds} s.", seconds=Number(timeout, 1)))
    return parse_form(body)


def _body_timeout_s(request: Request) -> float:
    runtime: Runtime = request.app.state.runtime
    return runtime.config.http.body_timeout_s


def parse_form(body: bytes) -> dict[str, str]:
    """An urlencoded form body as a dict; FormError for anything else (bad UTF-8, bad
    encoding, too many fields, a field given twice)."""
    try:
        pairs = urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body),
                                       max_num_fields=MAX_FORM_FIELDS)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormError(400, Text("The form could not be read: {error}.", error=str(exc))) from exc
    form: dict[str, str] = {}
    for key, value in pairs:
        if key in form:
            raise FormError(400, Text("The form field {field} appears twice.", field=repr(key)))
        form[key] = value
    return form


def check_form_token(form: dict[str, str], runtime: Runtime, *, consequence: Text) -> None:
    """Refuse (401) a form without the admin token; ``consequence`` ends the message."""
    token = form.get("token", "")
    if not token or not hmac.compare_digest(token.encode(), runtime.admin_token.encode()):
        raise FormError(401, Text("The admin token is missing or wrong; {consequence}.", consequence=consequence))


def json_error(
    status: int, message: str, errors: Sequence[str] = (), headers: dict[str, str] | None = None
) -> JsonResponse:
    body: dict[str, Any] = {"error": message}
    if errors:
        body["errors"] = list(errors)
    return JsonResponse(body, status_code=status, headers=headers)


def whole_number(raw: str, lo: int, hi: int) -> int | None:
    """``raw`` as an integer from ``lo`` to ``hi`` (0 <= lo), or None: ASCII digits only (not
    "²" or "٣", which ``str.isdigit`` takes), and no longer than ``hi`` is, so a 5,000-digit
    value is refused before ``int()`` (which raises beyond 4,300 digits)."""
    if not (raw.isascii() and raw.isdigit()) or len(raw.lstrip("0")) > len(str(hi)):
        return None
    value = int(raw)
    return value if lo <= value <= hi else None


def error_response(exc: ApiError) -> JsonResponse:
    """The JSON answer to an ApiError (401 with ``WWW-Authenticate: Bearer``)."""
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return json_error(exc.status, exc.message, exc.errors, headers)


def bearer_token(request: Request) -> str | None:
    return bearer_of(request.headers.get("authorization", ""))


def bearer_of(authorization: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value, or None."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def require_admin(request: Request, runtime: Runtime) -> None:
    """Refuse with 401 unless the request carries the admin bearer token."""
    token = bearer_token(request)
    if token is None or not hmac.compare_digest(token.encode(), runtime.admin_token.encode()):
        raise ApiError(401, "admin bearer token required (Authorization: Bearer <token>)")


async def read_json(request: Request, limit: int) -> Any:
    """The request's JSON body, refusing more than ``limit`` bytes before buffering them
    (413), a body that has not arrived whole within ``[http] body_timeout_s`` (408), and
    JSON beyond the reader's bounds (400 naming the path: nesting, integer size, NaN)."""
    return parse_json(await read_body(request, limit))


def parse_json(body: bytes) -> Any:
    """``body`` as JSON within the reader's bounds (appliance/protocol/json_bounds.py), or
    ApiError(400) naming the path of the value at fault."""
    try:
        return loads_bounded(body)
    except JsonBoundsError as exc:
        raise ApiError(400, f"body is beyond the box's JSON bounds at {exc.path}: {exc.reason}",
                       [f"{exc.path}: {exc.reason}"]) from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}") from exc


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refusing more than ``limit`` bytes before buffering them (413)
    and a body that has not arrived whole within ``[http] body_timeout_s`` (408)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad Content-Length")
        if int(declared) > limit:
            raise ApiError(413, f"body too large: {declared} bytes, the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    at_hand = request.scope["extensions"].get(BODY_AT_HAND) if "extensions" in request.scope else None
    if at_hand is not None and at_hand():
        # The server has read the whole body (a command's POST, nearly always): receive()
        # will not wait, so no deadline is set around it (a cancel scope with one costs ~6 us).
        message = await request.receive()
        chunk = _body_chunk(message, 0, limit)
        if not message.get("more_body", False):
            return chunk
        chunks.append(chunk)  # (not all of it after all: the rest within the deadline)
        size = len(chunk)
    timeout = _body_timeout_s(request)
    # A scope made directly and the messages taken from receive() as Request.stream() does
    # without its async generator: trio.move_on_after's generator-made context manager and
    # the stream's generator were a measurable part of a one-command POST
    # (docs/store-api.md, "Speed").
    with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
        while True:
            message = await request.receive()
            chunk = _body_chunk(message, size, limit)
            size += len(chunk)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
    if scope.cancelled_caught:
        raise ApiError(408, f"the body did not arrive within {timeout:g} s")
    return b"".join(chunks)


def _body_chunk(message: Message, size: int, limit: int) -> bytes:
    """The body bytes of one message of ``receive()``, after ``size`` bytes; ClientDisconnect
    on ``http.disconnect`` (as Request.stream() raises), ApiError(413) past ``limit``."""
    if message["type"] != "http.request":
        raise ClientDisconnect
    chunk: bytes = message.get("body", b"")
    if size + len(chunk) > limit:
        raise ApiError(413, f"body too large: over the limit of {limit} bytes")
    return chunk


def from_browser(scope: Scope) -> bool:
    """Whether the request has an ``Origin`` (a browser's): a front handler leaves it to the
    app, whose CORS middleware answers it (docs/store-api.md, "Speed")."""
    return any(name == b"origin" for name, _ in scope["headers"])


async def answer_in_front(scope: Scope, receive: Receive, send: Send,
                          endpoint: Callable[[Request], Awaitable[Response]]) -> None:
    """Answer with ``endpoint`` as a route would, without Starlette's middleware and router:
    an :class:`ApiError` as its JSON answer; any other exception as Starlette's error
    middleware does (a 500 for the client, the exception on to the server, which logs it)."""
    try:
        response = await endpoint(Request(scope, receive))
    except ApiError as exc:
        response = error_response(exc)
    except Exception:
        await PlainTextResponse("Internal Server Error", status_code=500)(scope, receive, send)
        raise
    await response(scope, receive, send)


def service_app(name: str, runtime: Runtime, routes: Sequence[BaseRoute] = (), *,
                cls: type[Starlette] = Starlette) -> Starlette:
    """A Starlette app (a ``cls``) for listener ``name`` with /healthz and JSON errors."""

    async def healthz(request: Request) -> Response:
        return JsonResponse({"service": name, "status": "ok", "version": __version__})

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = "not found" if exc.status_code == 404 else str(exc.detail)
        return json_error(exc.status_code, f"{message}: {request.method} {request.url.path} on the {name} service")

    app = cls(
        routes=[Route("/healthz", healthz), *routes],
        exception_handlers={ApiError: on_api_error, HTTPException: on_http_error},
    )
    app.state.runtime = runtime
    app.state.service = name
    return app

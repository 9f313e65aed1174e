"""CORS for the store API, events and media listeners: one middleware for all three.

A point-of-sale web app served from the platform (``[cors] allowed_origins``) may call the
box from a browser, and so may the box's own pages (its homepage on port 80 follows the
event stream on 8001). Preflights (``OPTIONS`` with ``Access-Control-Request-Method``) from
a configured origin are answered 204 with the methods and headers the box accepts, and
``Access-Control-Allow-Private-Network: true`` when the browser asks for it (Chromium's
Private Network Access: a public site reaching a private address). A preflight from any
other origin is refused (403, no CORS headers), so the browser blocks the request.
Actual responses to a configured origin carry ``Access-Control-Allow-Origin``.

No cookies are involved (the box authenticates with bearer tokens and signatures), so
credentials mode is never allowed. docs/events.md says what a browser app still cannot
do over plain HTTP.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Sequence
from typing import Final

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["ALLOWED_HEADERS", "CorsMiddleware", "origin_allowed"]

# Request headers a browser app may send (lower case): auth, JSON bodies, SSE resume,
# idempotent posts, media conditionals and ranges, and device signatures.
ALLOWED_HEADERS: Final = frozenset({
    "authorization", "content-type", "last-event-id", "idempotency-key", "if-none-match", "if-match",
    "if-range", "range", "signature", "signature-input", "content-digest", "x-device-id",
})
ALLOWED_METHODS: Final = ("GET", "HEAD", "POST", "OPTIONS")
# Response headers a browser app may read besides the simple ones.
EXPOSED_HEADERS: Final = "ETag, Content-Range, Accept-Ranges, Content-Length, Retry-After, Location"


def origin_allowed(origin: str, *, host: str, allowed: Sequence[str]) -> bool:
    """A browser ``Origin`` the box talks to: a configured one, or a page of the box
    itself (any of its ports, e.g. the homepage on 80 opening the stream on 8001)."""
    if origin in allowed:
        return True
    parsed = urllib.parse.urlsplit(origin)
    own = urllib.parse.urlsplit(f"//{host}").hostname
    return parsed.scheme in ("http", "https") and parsed.hostname is not None and parsed.hostname == own


class CorsMiddleware:
    def __init__(self, app: ASGIApp, *, origins: Sequence[str], max_age_s: int) -> None:
        self.app = app
        self.origins = frozenset(origins)
        self.max_age_s = max_age_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if scope["method"] == "OPTIONS" and origin is not None and "access-control-request-method" in headers:
            await self._preflight(origin, headers, send)
            return
        if origin is None or not self._allowed(origin, headers):
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                out["Access-Control-Allow-Origin"] = origin
                out["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
                out.add_vary_header("Origin")
            await send(message)

        await self.app(scope, receive, send_with_cors)

    def _allowed(self, origin: str, headers: Headers) -> bool:
        return origin_allowed(origin, host=headers.get("host", ""), allowed=tuple(self.origins))

    async def _preflight(self, origin: str, headers: Headers, send: Send) -> None:
        method = headers["access-control-request-method"].strip().upper()
        wanted = [h.strip().lower() for h in headers.get("access-control-request-headers", "").split(",") if h.strip()]
        refusal = ""
        if not self._allowed(origin, headers):
            refusal = f"origin {origin} is not allowed here; add it to [cors] allowed_origins"
        elif method not in ALLOWED_METHODS:
            refusal = f"method {method} is not allowed from a browser"
        elif bad := [h for h in wanted if h not in ALLOWED_HEADERS]:
            refusal = f"request header(s) {', '.join(bad)} are not allowed from a browser"
        if refusal:
            body = json.dumps({"error": f"CORS preflight refused: {refusal}"}).encode()
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()), (b"vary", b"Origin")]})
            await send({"type": "http.response.body", "body": body})
            return
        out = [
            (b"access-control-allow-origin", origin.encode()),
            (b"access-control-allow-methods", ", ".join(ALLOWED_METHODS).encode()),
            (b"access-control-max-age", str(self.max_age_s).encode()),
            (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers, "
                      b"Access-Control-Request-Private-Network"),
            (b"content-length", b"0"),
        ]
        if wanted:
            out.append((b"access-control-allow-headers", ", ".join(wanted).encode()))
        if headers.get("access-control-request-private-network", "").strip().lower() == "true":
            out.append((b"access-control-allow-private-network", b"true"))
        await send({"type": "http.response.start", "status": 204, "headers": out})
        await send({"type": "http.response.body", "body": b""})

"""What every listener's app is wrapped in: allowed Host values, security headers, and a
process-wide budget for request bodies in memory.

- **Hosts** (DNS rebinding): a page on a hostile site whose name the attacker re-points at
  the box's address would reach the admin pages with the attacker's ``Host``. Only IP
  literals (a rebinding needs a name), ``localhost``, the box's own names (hostname,
  ``hostname.local``, its FQDN) and ``[http] allowed_hosts`` are served; anything else gets
  421 before the app runs. A request without ``Host`` (HTTP/1.0) cannot come from a browser
  and is served.
- **Headers** on every response: ``X-Frame-Options: DENY`` and a CSP that allows no framing,
  forms to this origin only and no script but an HTML page's own inline ones, by hash; ``Referrer-Policy: no-referrer``;
  ``X-Content-Type-Options: nosniff``.
- **Work**: each listener handles at most ``[http] max_requests_in_progress`` requests at
  once; the others wait, not runnable, so a crowd on the homepage cannot fill the event
  loop's run queue and delay everything else (``/healthz`` and WebSockets are exempt, and
  the listeners whose requests are long streams, events and media, have no such limit).
- **Bodies**: a parsed 1 MiB JSON body can take 20 MB of objects, so the bytes of request
  bodies being handled at once are capped by a :class:`~appliance.services.budget.BodyBudget`; a request with a body
  holds its declared size (or the listener's limit, if it declares none) from its start to
  its response. A request that cannot get room within ``wait_s`` is answered 503 with
  ``Retry-After`` (its body read and dropped, so the client can read the answer); nothing
  is buffered meanwhile.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
import socket
from collections.abc import Iterable
from typing import Final

import trio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.services.budget import BodyBudget

__all__ = ["SECURITY_HEADERS", "allowed_host_names", "guard", "host_allowed"]

# Scripts: only the inline ones of the page itself, each allowed by its hash (computed from
# the page as it is sent), so an injected script never runs. The homepage's live part
# follows the event stream on another port: connections may go to any http(s) origin.
_CSP: Final = ("default-src 'none'; script-src {scripts}; connect-src 'self' http: https:; "
               "style-src 'unsafe-inline'; img-src 'self' data:; media-src 'self'; form-action 'self'; "
               "frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS: Final[tuple[tuple[bytes, bytes], ...]] = (
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", _CSP.format(scripts="'none'").encode()),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
)
_CLOSE: Final = ((b"connection", b"close"),)
_INLINE_SCRIPT: Final = re.compile(rb"<script>(.*?)</script>", re.S)


def content_security_policy(html: bytes) -> bytes:
    """The CSP for a page: its own inline scripts (``<script>`` without attributes) by hash."""
    hashes = [f"'sha256-{base64.b64encode(hashlib.sha256(m.group(1)).digest()).decode()}'"
              for m in _INLINE_SCRIPT.finditer(html)]
    return _CSP.format(scripts=" ".join(hashes) or "'none'").encode()
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Host values judged, kept with their verdict: a client sends the same one on every request
# (parsing it as an address each time was a tenth of the guard's time). Cleared when full, so
# a client sending ever new values cannot grow it.
_HOSTS_KEPT: Final = 256


def allowed_host_names(configured: Iterable[str]) -> frozenset[str]:
    """The names served besides IP literals: localhost, this machine's names, ``configured``."""
    names = {"localhost", *(n.lower().rstrip(".") for n in configured)}
    host = socket.gethostname().lower()
    if host:
        names.update({host, f"{host}.local", socket.getfqdn().lower()})
    return frozenset(names)


def _host_of(value: str) -> str:
    value = value.strip().lower()
    if value.startswith("["):  # [v6]:port
        return value[1:value.find("]")] if "]" in value else value
    host, _, port = value.rpartition(":")
    return host if host and port.isdigit() else value


def host_allowed(value: str | None, names: frozenset[str]) -> bool:
    if value is None or "*" in names:
        return True
    host = _host_of(value).rstrip(".")
    if host in names:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _with_headers(start: Message, extra: Iterable[tuple[bytes, bytes]]) -> Message:
    """``start`` with each of ``extra`` it does not set itself (the first of a name wins)."""
    present = {k.lower() for k, _ in start.get("headers", [])}
    added = []
    for name, value in extra:
        if name not in present:
            added.append((name, value))
            present.add(name)
    return {**start, "headers": [*start.get("headers", []), *added]}


async def _plain(send: Send, status: int, message: str, extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *SECURITY_HEADERS, *extra]})
    await send({"type": "http.response.body", "body": body})


def guard(app: ASGIApp, *, names: frozenset[str], budget: BodyBudget, max_body_bytes: int,
          wait_s: float, requests: trio.CapacityLimiter | None) -> ASGIApp:
    """``app`` behind the Host check, the security headers, the listener's limit on
    requests handled at once (``/healthz`` is exempt: it must answer under any load) and the
    body budget."""
    verdicts: dict[bytes | None, bool] = {}

    def served(raw_host: bytes | None) -> bool:
        verdict = verdicts.get(raw_host)
        if verdict is None:
            verdict = host_allowed(raw_host.decode("latin-1") if raw_host is not None else None, names)
            if len(verdicts) >= _HOSTS_KEPT:
                verdicts.clear()
            verdicts[raw_host] = verdict
        return verdict

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if not served(headers.get(b"host")):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await _plain(send, 421, "this box does not answer to that host name; use its address or its name "
                                    "(or add the name to [http] allowed_hosts)")
            return

        held: list[Message] = []
        # A request whose body has not all been received when its answer starts (a 413 on its
        # declared length, a 401 before the body is read): the server cannot read the next
        # request on that connection and closes it after the answer, so the answer says so
        # (RFC 9112 9.6). Without it a keep-alive client sends its next request into a
        # connection being closed, and gets no answer.
        unread = scope["type"] == "http" and (headers.get(b"content-length", b"0") not in (b"0", b"")
                                              or b"transfer-encoding" in headers)
        if unread:
            inner = receive

            async def receive() -> Message:
                nonlocal unread
                message = await inner()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    unread = False
                return message

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                if unread:
                    message = _with_headers(message, _CLOSE)
                ctype = next((v for k, v in message.get("headers", []) if k.lower() == b"content-type"), b"")
                if ctype.startswith(b"text/html"):
                    held.append(message)  # its CSP depends on the page's scripts: sent with the body
                    return
                await send(_with_headers(message, SECURITY_HEADERS))
                return
            if held and message["type"] == "http.response.body":
                start = held.pop()
                body = message.get("body", b"") if not message.get("more_body", False) else b""
                csp = ((b"content-security-policy", content_security_policy(body)),)
                await send(_with_headers(start, csp + SECURITY_HEADERS))
            await send(message)

        if scope["type"] != "http" or scope.get("path") == "/healthz":
            await app(scope, receive, send_with_headers)
            return
        if requests is None:
            await _with_body_budget(scope, receive, send_with_headers, headers)
            return
        # A free place is taken without a checkpoint (``async with`` yields to the scheduler
        # even then: one more pass of the run queue per request under load).
        try:
            requests.acquire_nowait()
        except trio.WouldBlock:
            await requests.acquire()
        try:
            await _with_body_budget(scope, receive, send_with_headers, headers)
        finally:
            requests.release()

    async def _with_body_budget(scope: Scope, receive: Receive, send_with_headers: Send,
                                headers: dict[bytes, bytes]) -> None:
        if scope["method"] not in _BODY_METHODS:
            await app(scope, receive, send_with_headers)
            return
        declared = headers.get(b"content-length", b"")
        size = int(declared) if declared.isdigit() and len(declared) < 12 else max_body_bytes
        if size == 0:
            await app(scope, receive, send_with_headers)
            return
        held = budget.try_acquire(min(size, max_body_bytes))  # no deadline to set up when there is room
        if not held:
            with trio.move_on_after(wait_s):
                held = await budget.acquire(min(size, max_body_bytes))
        if not held:
            # The client is still sending: take the body (a chunk at a time, nothing kept,
            # within wait_s again) so it can read the answer instead of stalling on its write.
            with trio.move_on_after(wait_s):
                while (await receive()).get("more_body", False):
                    pass
            await _plain(send_with_headers, 503, "the box is busy with other requests' bodies; try again shortly",
                         ((b"retry-after", b"1"),))
            return
        try:
            await app(scope, receive, send_with_headers)
        finally:
            budget.release(held)

    return guarded

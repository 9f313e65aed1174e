"""Who is calling: the admin (bearer token) or an adopted device (a signed request).

:func:`authenticate` is the one check every device-facing route runs (store API on 8000;
the events and media listeners call :func:`authenticate_device` for their device
requests and WebSocket handshakes). A device request is signed as docs/device-api.md
says (RFC 9421 profile, :mod:`appliance.protocol.identity`): the signature is checked
with the device's key, then its ``created`` against the window and its nonce against the
device's replay guard (a nonce is remembered only once the signature verified, so a
stranger can fill nothing). Only an adopted device with a key passes; its id is the
signer, and a route that takes a ``device_id`` must compare it (:meth:`Caller.require`).

Failures answer 401 with a line that says what to fix (403 for a known device that may
not do this, 429 under a flood of one device's requests); each is counted in
``device_auth_refused{reason}``.
"""

from __future__ import annotations

import hmac
import time
from functools import partial
from typing import Final

import attrs
from starlette.requests import HTTPConnection, Request
from starlette.types import Scope

from appliance.protocol import identity as idp
from appliance.services.keyring import Trusted
from appliance.services.runtime import Runtime
from appliance.services.web.common import ApiError, bearer_of, read_body
from appliance.storage.devices import AdoptionState, get_device

__all__ = ["Caller", "authenticate", "authenticate_device"]

_METRIC: Final = "device_auth_refused"
_SIGNATURE_HEADERS: Final = {name.encode("ascii"): name for name in ("signature-input", "signature", "content-digest")}
_METHODS: Final = {method: method.encode("ascii") for method in ("GET", "POST", "PUT", "PATCH", "DELETE")}


@attrs.frozen(kw_only=True)
class Caller:
    """The admin (``device_id`` None) or the adopted device that signed the request, and
    the request's body (read once, bounded; empty when not asked for)."""

    device_id: str | None
    body: bytes = b""

    @property
    def is_admin(self) -> bool:
        return self.device_id is None

    def require(self, device_id: object, what: str) -> None:
        """403 unless the admin called or ``device_id`` is the signer's own id."""
        if self.device_id is not None and device_id != self.device_id:
            raise ApiError(403, f"device {self.device_id} may not act for {device_id!r}: {what} must carry the "
                                "signing device's own id")


def _refuse(runtime: Runtime, status: int, reason: str, message: str) -> ApiError:
    runtime.metrics.inc(_METRIC, reason=reason)
    return ApiError(status, message)


async def _trusted(runtime: Runtime, device_id: str) -> Trusted | None:
    """A device not in the key ring's cache: its row, remembered unless it changed meanwhile."""
    generation = runtime.keys.generation
    # One row by its primary key, in trio's thread: a crowd of devices not yet cached (the
    # first minute after a start) must not queue for the worker threads' readers.
    device = await runtime.db.read_small(partial(get_device, device_id=device_id))
    if device is None:
        return None
    if runtime.keys.generation != generation:  # its state changed while it was read: not cached
        return runtime.keys.trusted(device)
    return runtime.keys.remember(device)


def _credentials(scope: Scope) -> tuple[str | None, dict[str, bytes]]:
    """The request's Authorization value and its signature headers by lower-case name (the
    first of each, as Starlette's lookup gives; as received, for the signature's patterns),
    in one pass over its headers rather than one per name (a signed request carries five or
    six)."""
    authorization: str | None = None
    signature: dict[str, bytes] = {}
    for name, value in scope["headers"]:
        key = _SIGNATURE_HEADERS.get(name)
        if key is not None:
            if key not in signature:
                signature[key] = value
        elif name == b"authorization" and authorization is None:
            authorization = value.decode("latin-1")
    return authorization, signature


def _method(scope: Scope) -> bytes:
    method: str = scope.get("method", "GET")  # (a WebSocket handshake's scope has none: a GET)
    return _METHODS.get(method) or method.encode("latin-1")


async def authenticate_device(conn: HTTPConnection, runtime: Runtime, *, body: bytes = b"",
                              headers: dict[str, bytes] | None = None) -> str:
    """The id of the adopted device that signed this request (or WebSocket handshake), or
    ApiError (401/403/429). ``body`` is the request's body as received (empty for a GET or
    a WebSocket handshake); ``headers``, its signature headers if the caller has them."""
    scope = conn.scope
    keys = runtime.keys
    check = keys.check  # (native or Python: appliance.protocol.sigcheck)
    try:
        signed = check.parse(_credentials(scope)[1] if headers is None else headers)
    except idp.SignatureError as exc:
        raise _refuse(runtime, exc.status, exc.reason, f"{exc}") from exc
    trusted = keys.cached(signed.keyid) or await _trusted(runtime, signed.keyid)
    if trusted is None or trusted.mac is None:
        raise _refuse(runtime, 401, "no_key", f"device {signed.keyid!r} has no key on this box: enroll on the "
                                               "provisioning port and have the manager adopt it")
    # The path and query as the request line carried them (bytes, as the device signed them).
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
    end = raw_path.find(b"?")
    try:
        check.verify(trusted.mac, signed, _method(scope), raw_path if end < 0 else raw_path[:end],
                     scope.get("query_string", b""), body)
    except idp.SignatureError as exc:
        raise _refuse(runtime, exc.status, exc.reason, str(exc)) from exc
    if trusted.state is not AdoptionState.ADOPTED:
        raise _refuse(runtime, 403, "not_adopted", f"device {signed.keyid} is {trusted.state}: only adopted devices "
                                                   "may use the store API (the manager adopts it on the homepage)")
    try:
        keys.guard(signed.keyid).check(signed.nonce, signed.created, time.time())
    except idp.Replayed as exc:
        raise _refuse(runtime, exc.status, exc.reason, str(exc)) from exc
    return signed.keyid


async def authenticate(request: Request, runtime: Runtime, *, body_limit: int = 0, admin: bool = True) -> Caller:
    """The admin (bearer token, if ``admin``) or an adopted device (signature). With
    ``body_limit`` the body is read (refused over the limit before buffering) and handed
    back in :attr:`Caller.body`; the signature covers it."""
    authorization, signature = _credentials(request.scope)
    token = bearer_of(authorization) if authorization is not None else None
    if token is not None or "signature-input" not in signature:
        if admin and token is not None and hmac.compare_digest(token.encode(), runtime.admin_token.encode()):
            return Caller(device_id=None, body=await read_body(request, body_limit) if body_limit else b"")
        what = "a device signature (docs/device-api.md)" + (" or the admin bearer token" if admin else "")
        raise _refuse(runtime, 401, "unsigned", f"this route needs {what}")
    body = await read_body(request, body_limit) if body_limit else b""
    return Caller(device_id=await authenticate_device(request, runtime, body=body, headers=signature), body=body)


def describe_metrics(runtime: Runtime) -> None:
    runtime.metrics.describe_counter(_METRIC, "device requests refused by signature checks, by reason")

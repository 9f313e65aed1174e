"""Enrollment on the provisioning listener (port 8003): a device asks to be adopted, with a key.

No secret crosses the LAN: the device sends an X25519 public key, gets the box's, and
both derive the device key (docs/device-api.md). Three routes, no token (a device has
none; nothing here grants anything until a manager adopts the device on the homepage):

- ``POST /v1/enroll`` ``{device_id, kind, name, port, public_key, commitment}`` -> 202
  ``{status, appliance_id, box_public_key, box_nonce, replaces}``. ``commitment`` is
  SHA-256("chub commit v1\\0" + public key + the device's nonce), the nonce kept secret
  for now. An earlier enrollment under the same id is replaced; for a device the box
  already has (``replaces``: true) nothing changes until a manager accepts it. 503 when
  the list of devices waiting for adoption is full (per source address, or in all).
- ``POST /v1/enroll/{device_id}/reveal`` ``{public_key, nonce}`` -> 200: the nonce
  matches the commitment; the homepage now shows the comparison code beside the device.
  The box never sends the code: the device computes it and shows it on its own screen.
- ``GET /v1/enroll/{device_id}?public_key=HEX`` -> ``{state, key_accepted}``: whether the
  manager adopted the device with that key (the device polls this while it waits).

The address the homepage shows, and the one the box later connects to, is the source
address of the enrollment request, not anything the device claims.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from functools import partial
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from appliance.protocol import discovery as wire
from appliance.protocol import identity as idp
from appliance.services.runtime import Runtime
from appliance.services.web.common import ApiError, read_json
from appliance.services.web.parts import WebParts
from appliance.storage.devices import AdoptionState, get_device
from appliance.storage.enrollments import Enrollment, get_enrollment, offer, reveal

__all__ = ["provisioning_parts", "routes"]

# An enrollment is a few hundred bytes of JSON.
MAX_ENROLL_BYTES: Final = 2048
_FULL: Final = {"full": "the box's list of devices waiting for adoption is full",
                "address_full": "too many devices from this address are waiting for adoption"}


def _field(data: dict[str, Any], key: str, errors: list[str]) -> Any:
    if key not in data:
        errors.append(f"{key}: required")
    return data.get(key)


def _hex(value: Any, key: str, size: int, errors: list[str]) -> bytes:
    try:
        return idp.key_from_hex(value, key, size)
    except idp.BadKey as exc:
        errors.append(str(exc))
        return b""


def _parse_offer(data: Any, address: str, box_nonce: str, now: float) -> Enrollment:
    if not isinstance(data, dict):
        raise ApiError(400, "not a valid enrollment", ["(top level): must be a JSON object"])
    errors: list[str] = []
    fields = {k: _field(data, k, errors) for k in ("device_id", "kind", "name", "port", "public_key", "commitment")}
    public = _hex(fields["public_key"], "public_key", idp.KEY_BYTES, errors)
    _hex(fields["commitment"], "commitment", 32, errors)
    if not errors:
        try:  # the same rules as a discovery probe's
            wire.Probe(device_id=fields["device_id"], kind=fields["kind"], name=fields["name"],
                       port=fields["port"], nonce="")
        except wire.InvalidMessage as exc:
            errors.append(str(exc))
    if not errors and not 1 <= fields["port"] <= 65535:
        errors.append("port: the device channel port, 1-65535")
    if errors:
        raise ApiError(400, "not a valid enrollment", errors)
    return Enrollment(device_id=fields["device_id"], kind=fields["kind"], name=fields["name"], address=address,
                      port=fields["port"], public_key=public.hex(), commitment=fields["commitment"],
                      box_nonce=box_nonce, device_nonce=None, code=None, created=now)


def routes(runtime: Runtime) -> Sequence[BaseRoute]:
    metrics = runtime.metrics
    metrics.describe_counter("enrollments", "enrollment requests recorded, by outcome")

    async def enroll(request: Request) -> Response:
        address = request.client.host if request.client else ""
        data = await read_json(request, MAX_ENROLL_BYTES)
        enrollment = _parse_offer(data, address, secrets.token_hex(idp.NONCE_BYTES), time.time())
        offered = await runtime.db.write(partial(offer, enrollment=enrollment))
        if offered.refused == "config":
            metrics.inc("enrollments", outcome="config")
            raise ApiError(409, f"device {enrollment.device_id!r} is declared in the box's configuration "
                                "([[devices]]): it uses the pre-shared key set there, not enrollment")
        if offered.refused is not None:
            metrics.inc("enrollments", outcome=offered.refused)
            raise ApiError(503, f"{_FULL[offered.refused]}; ask the manager to adopt or reject the devices on the "
                                "homepage, then enroll again")
        metrics.inc("enrollments", outcome="replacement" if offered.replaces else "new")
        if offered.created_device or offered.replaces:
            runtime.device_changes.notify()
        return JSONResponse({"status": "pending", "appliance_id": runtime.appliance_id,
                             "box_public_key": runtime.keys.box_public.hex(), "box_nonce": enrollment.box_nonce,
                             "replaces": offered.replaces is not None}, status_code=202)

    async def reveal_nonce(request: Request) -> Response:
        device_id = request.path_params["device_id"]
        data = await read_json(request, MAX_ENROLL_BYTES)
        if not isinstance(data, dict):
            raise ApiError(400, "expected {\"public_key\": HEX, \"nonce\": HEX}")
        errors: list[str] = []
        public = _hex(data.get("public_key"), "public_key", idp.KEY_BYTES, errors)
        nonce = _hex(data.get("nonce"), "nonce", idp.NONCE_BYTES, errors)
        if errors:
            raise ApiError(400, "not a valid reveal", errors)
        enrollment = await runtime.db.read(partial(get_enrollment, device_id=device_id))
        if enrollment is None or enrollment.public_key != public.hex():
            raise ApiError(404, f"no enrollment of device {device_id!r} with this public key: enroll first "
                                "(or again: another enrollment under this id replaced yours)")
        if idp.commitment(public, nonce).hex() != enrollment.commitment:
            metrics.inc("enrollments", outcome="bad_commitment")
            raise ApiError(403, "the nonce does not match the commitment sent with the enrollment")
        code = idp.comparison_code(public, runtime.keys.box_public, nonce, bytes.fromhex(enrollment.box_nonce))
        await runtime.db.write(partial(reveal, device_id=device_id, device_nonce=nonce.hex(), code=code))
        runtime.device_changes.notify()  # the homepage shows the code now
        return JSONResponse({"status": "pending"})

    async def status(request: Request) -> Response:
        device_id = request.path_params["device_id"]
        device = await runtime.db.read(partial(get_device, device_id=device_id))
        asked = request.query_params.get("public_key", "")
        state = "unknown" if device is None else str(device.state)
        accepted = device is not None and device.state is AdoptionState.ADOPTED and bool(asked) \
            and device.public_key == asked
        return JSONResponse({"device_id": device_id, "state": state, "key_accepted": accepted})

    return [
        Route("/v1/enroll", enroll, methods=["POST"]),
        Route("/v1/enroll/{device_id}/reveal", reveal_nonce, methods=["POST"]),
        Route("/v1/enroll/{device_id}", status, methods=["GET"]),
    ]


def provisioning_parts() -> WebParts:
    return WebParts(routes=(routes,))

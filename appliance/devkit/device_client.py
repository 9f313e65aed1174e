"""The device's side of identity, for the simulators, the demo, the benchmark and tests.

- :class:`DeviceAuth`: an ``httpx`` auth that signs every request with the device key
  (docs/device-api.md: the RFC 9421 profile). ``httpx.AsyncClient(auth=DeviceAuth(...))``.
- :func:`enroll`: enrollment on the provisioning port, the way a device does it: a fresh
  X25519 key pair, a commitment to a nonce, the box's public key and nonce back, the nonce
  revealed, the comparison code computed here (never taken from the box), the device key
  derived on this side. :func:`wait_adopted` polls until a manager accepted the key.

A device key is a secret: nothing here logs or prints it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Generator

import attrs
import httpx
import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from appliance.protocol import identity as idp

__all__ = ["DeviceAuth", "Enrolled", "enroll", "wait_adopted"]


class DeviceAuth(httpx.Auth):
    """Signs each request as ``device_id`` with ``key`` (Content-Digest, Signature-Input,
    Signature). ``clock`` gives Unix seconds (a device that knows its clock is off passes a
    corrected one)."""

    requires_request_body = True

    def __init__(self, device_id: str, key: bytes, *, clock: Callable[[], float] = time.time) -> None:
        self.device_id, self._key, self._clock = device_id, key, clock

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        path, _, query = request.url.raw_path.decode("ascii").partition("?")
        request.headers.update(idp.sign_request(
            self._key, device_id=self.device_id, method=request.method, path=path, query=query,
            body=request.content, created=int(self._clock()), nonce=secrets.token_hex(idp.NONCE_BYTES)))
        yield request


@attrs.frozen(kw_only=True)
class Enrolled:
    """What a device keeps after enrolling: its key pair's public half, the box's, the
    derived device key and the code to show on its screen."""

    device_id: str
    public_key: bytes
    box_public_key: bytes
    key: bytes = attrs.field(repr=False)
    code: str
    replaces: bool


async def enroll(client: httpx.AsyncClient, *, device_id: str, kind: str, name: str, port: int,
                 private: X25519PrivateKey | None = None) -> Enrolled:
    """Enroll on the provisioning listener ``client`` points at (its ``base_url``).
    Raises httpx.HTTPStatusError with the box's answer if it refuses."""
    private = private or idp.new_private_key()
    public, nonce = idp.public_bytes(private), secrets.token_bytes(idp.NONCE_BYTES)
    answer = await client.post("/v1/enroll", json={
        "device_id": device_id, "kind": kind, "name": name, "port": port, "public_key": public.hex(),
        "commitment": idp.commitment(public, nonce).hex()})
    answer.raise_for_status()
    offer = answer.json()
    box_public = idp.key_from_hex(offer["box_public_key"], "box_public_key")
    box_nonce = idp.key_from_hex(offer["box_nonce"], "box_nonce", idp.NONCE_BYTES)
    revealed = await client.post(f"/v1/enroll/{device_id}/reveal", json={"public_key": public.hex(),
                                                                        "nonce": nonce.hex()})
    revealed.raise_for_status()
    key = idp.derive_device_key(private, box_public, device_id=device_id, device_public=public, box_public=box_public)
    return Enrolled(device_id=device_id, public_key=public, box_public_key=box_public, key=key,
                    code=idp.comparison_code(public, box_public, nonce, box_nonce), replaces=bool(offer["replaces"]))


async def wait_adopted(client: httpx.AsyncClient, enrolled: Enrolled, *, every_s: float = 1.0) -> None:
    """Return once the box says this device was adopted with this key (poll; bound it with
    a deadline at the call site)."""
    while True:
        answer = await client.get(f"/v1/enroll/{enrolled.device_id}",
                                  params={"public_key": enrolled.public_key.hex()})
        if answer.status_code == 200 and answer.json().get("key_accepted"):
            return
        await trio.sleep(every_s)

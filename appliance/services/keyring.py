"""The box's key pair and the device keys, as the listeners, discovery and the dispatcher use them.

One :class:`KeyRing` per running appliance (``runtime.keys``), made by the supervisor from
the state directory: the box's X25519 private key lives in ``box.key`` (mode 0600, made
on first start). A device's key is derived from it and the public key the device enrolled
with (:func:`appliance.protocol.identity.derive_device_key`); a device declared in
``[[devices]]`` uses its pre-shared ``key`` instead. The database holds public keys only.

The ring caches, per device id, what a signed request needs (the device's state and key)
so a request costs no database read once the device is known. Every change of a device's
key or state goes through :meth:`KeyRing.forget` (the admin actions, enrollment,
``[[devices]]`` at start), which also sets the device's revocation event: whoever holds a
stream open for that device (the events listener, the dispatcher) closes it at once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from appliance.config import ConfigError
from appliance.protocol import identity as idp
from appliance.protocol import sigcheck
from appliance.storage.devices import AdoptionState, Device, DeviceSource
from appliance.storage.secrets import read_secret, write_secret

__all__ = ["BOX_KEY_FILE", "KeyRing", "Trusted", "load_box_key"]

BOX_KEY_FILE: Final = "box.key"
# How far a signed request's ``created`` may be from the box's clock, either way. Devices
# set their clock from the Date header of any answer, or the discovery announce's ts.
SIGNATURE_WINDOW_S: Final = 30.0
# Nonces remembered per device: more than 4096 signed requests by one device within one
# second would be refused (429), never accepted twice (appliance.protocol.identity.ReplayGuard).
MAX_NONCES_PER_DEVICE: Final = 4096


def load_box_key(state_dir: Path) -> X25519PrivateKey:
    """The box's private key from ``state_dir/box.key``, made on first use. Blocking."""
    path = state_dir / BOX_KEY_FILE
    text = read_secret(path)
    if text is None:
        key = idp.new_private_key()
        write_secret(path, idp.private_hex(key))
        return key
    return idp.private_from_hex(text)


@attrs.frozen(kw_only=True)
class Trusted:
    """What the box trusts of one device right now; ``mac`` is its key made ready for
    checking signed requests by the ring's check (:attr:`KeyRing.check`), made once."""

    device_id: str
    state: AdoptionState
    key: bytes | None = attrs.field(repr=False)
    mac: object | None = attrs.field(repr=False, eq=False)


class KeyRing:
    def __init__(self, box_private: X25519PrivateKey, *, declared: Mapping[str, str] | None = None,
                 window_s: float = SIGNATURE_WINDOW_S, max_nonces: int = MAX_NONCES_PER_DEVICE,
                 check: sigcheck.Check | None = None) -> None:
        self._private = box_private
        # The signed-request check (native or Python), chosen once: sigcheck.choose().
        if check is not None:
            self.check, self.check_why = check, "given"
        else:
            try:
                self.check, self.check_why = sigcheck.choose(os.environ)
            except ValueError as exc:  # (`appliance run` prints it as a configuration error)
                raise ConfigError([f"environment: {exc}"]) from None
        self.box_public = idp.public_bytes(box_private)
        self._declared = {device_id: bytes.fromhex(key) for device_id, key in (declared or {}).items() if key}
        self._window_s, self._max_nonces = window_s, max_nonces
        self._trusted: dict[str, Trusted] = {}
        self._derived: dict[tuple[str, str], bytes] = {}
        self._guards: dict[str, idp.ReplayGuard] = {}
        self._revoked: dict[str, trio.Event] = {}
        # Counts forget() calls: a caller that read a device may remember it only if nothing
        # was forgotten meanwhile (else it would cache what was true before the change).
        self.generation = 0

    def key_of(self, device: Device) -> bytes | None:
        """The key ``device`` signs and proves with, or None (it has none yet)."""
        if device.source is DeviceSource.CONFIG:
            return self._declared.get(device.id)
        if device.public_key is None:
            return None
        cache_key = (device.id, device.public_key)
        key = self._derived.get(cache_key)
        if key is None:
            public = bytes.fromhex(device.public_key)
            key = idp.derive_device_key(self._private, public, device_id=device.id, device_public=public,
                                        box_public=self.box_public)
            self._derived[cache_key] = key
        return key

    def derive_for(self, device_id: str, public_key: bytes) -> bytes:
        """The key a device enrolling with ``public_key`` will have (for its signed probes)."""
        return idp.derive_device_key(self._private, public_key, device_id=device_id, device_public=public_key,
                                     box_public=self.box_public)

    def cached(self, device_id: str) -> Trusted | None:
        return self._trusted.get(device_id)

    def trusted(self, device: Device) -> Trusted:
        """What the box trusts of ``device`` (not cached: :meth:`remember` caches it)."""
        key = self.key_of(device)
        return Trusted(device_id=device.id, state=device.state, key=key,
                       mac=None if key is None else self.check.key(key))

    def remember(self, device: Device) -> Trusted:
        trusted = self._trusted[device.id] = self.trusted(device)
        return trusted

    def guard(self, device_id: str) -> idp.ReplayGuard:
        guard = self._guards.get(device_id)
        if guard is None:
            guard = self._guards[device_id] = idp.ReplayGuard(window_s=self._window_s, max_nonces=self._max_nonces)
        return guard

    def revoked(self, device_id: str) -> trio.Event:
        """Set as soon as ``device_id``'s key or state changes (revoked, rejected, replaced):
        close anything that was opened on the strength of its old key."""
        event = self._revoked.get(device_id)
        if event is None:
            event = self._revoked[device_id] = trio.Event()
        return event

    def forget(self, device_id: str | None = None) -> None:
        """A device's key or state changed (all devices: None): drop what was cached and
        wake whoever waits on :meth:`revoked`."""
        self.generation += 1
        ids = list(self._trusted) + list(self._revoked) if device_id is None else [device_id]
        for i in ids:
            self._trusted.pop(i, None)
            event = self._revoked.pop(i, None)
            if event is not None:
                event.set()
        if device_id is None:
            self._derived.clear()
        else:
            for cache_key in [k for k in self._derived if k[0] == device_id]:
                del self._derived[cache_key]

    def set_declared(self, declared: Mapping[str, str]) -> None:
        self._declared = {device_id: bytes.fromhex(key) for device_id, key in declared.items() if key}
        self.forget()

"""The admin listener's JSON bodies (port 80, ``/api/*``), sans-I/O: one definition each, from
which the encoding and the JSON Schema of ``GET /api/openapi.json`` come (docs/store-api.md,
"The admin JSON routes"). What the box reports (status, devices) carries more than is
listed here as it grows: those bodies are open (other fields may appear).
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from appliance.protocol.bodies import Body, Matches

__all__ = ["ADMIN_BODIES", "BundleAccepted", "DeviceAction", "DeviceAnswer", "DeviceChange", "DeviceList",
           "PairingAnswer", "PairingRequest", "SettingsAnswer", "SettingsRequest", "Status", "SupportAnswer",
           "SupportSwitch"]


class Status(Body, frozen=True, forbid_unknown_fields=False):
    """The box at a glance, as the homepage shows it; each feature adds its keys (devices,
    cloud, orders, support, media, device links, outbox...)."""

    appliance_id: str
    version: str
    uptime_s: float
    ports: dict[str, int]
    services: tuple[dict[str, Any], ...]
    ready: bool
    not_ready: tuple[str, ...]


class Device(Body, frozen=True, forbid_unknown_fields=False):
    """A device of the registry, its adoption state, its key, and its enrollment waiting
    for a decision (null if none)."""

    id: str
    kind: str
    name: str
    address: str
    port: int
    state: Literal["pending", "adopted", "rejected"]
    source: str
    key: str
    gets_commands: bool
    enrollment: dict[str, Any] | None


class DeviceList(Body, frozen=True):
    """Every device of the registry."""

    devices: tuple[Device, ...]


class DeviceAnswer(Body, frozen=True):
    """One device of the registry."""

    device: Device


class DeviceAction(Body, frozen=True):
    """The comparison code the manager checked on the device's screen (to adopt a device
    that enrolled with a key); no body for the other actions."""

    code: Annotated[str, Matches(r"[0-9]{6}", rule="the 6 digits shown on the device")]


class DeviceChange(Body, frozen=True):
    """The device after the action, and whether anything changed."""

    device: dict[str, Any]
    changed: bool


class PairingRequest(Body, frozen=True):
    """The one-time pairing code from the back office."""

    code: str


class PairingAnswer(Body, frozen=True):
    """The pairing as it now stands (never the token or the secrets)."""

    pairing: dict[str, Any]


class SettingsRequest(Body, frozen=True):
    """The setup file's sections to change (docs/setup.md); a section left out is unchanged."""

    box: dict[str, Any] | None = None
    network: dict[str, Any] | None = None
    proxy: dict[str, Any] | None = None


class SettingsAnswer(Body, frozen=True):
    """What was saved, in words, and the settings as they now stand."""

    saved: tuple[str, ...]
    settings: dict[str, Any]


class SupportSwitch(Body, frozen=True):
    """The remote support channel on (for ``[support] duration_s``) or off."""

    enabled: bool


class SupportAnswer(Body, frozen=True):
    """The support window in words, and until when (Unix seconds; null when off)."""

    support: str
    until: float | None


class BundleAccepted(Body, frozen=True):
    """A firmware bundle taken: its signature checked against the box's keyring, waiting
    for its install (``when``: at once, or in the maintenance window); ``update`` is the
    update's state as ``/api/status`` shows it (docs/updates.md)."""

    version: str
    sha256: str
    size: int
    name: str
    when: Literal["now", "window"]
    update: dict[str, Any]


ADMIN_BODIES: Final = (Status, DeviceList, DeviceAnswer, DeviceAction, DeviceChange, PairingRequest, PairingAnswer,
                       SettingsRequest, SettingsAnswer, SupportSwitch, SupportAnswer, BundleAccepted)

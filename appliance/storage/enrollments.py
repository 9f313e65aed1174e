"""Enrollments waiting for an admin: one per device id, the latest (docs/device-api.md).

A device enrolls on the provisioning port with its public key and a commitment to a
nonce (:func:`offer`); it then reveals the nonce and the comparison code is known
(:func:`reveal`). An admin who compared the code on both screens accepts it
(:func:`accept`): the device gets that key, the address it enrolled from, and is adopted.
An enrollment for a device that already exists (a factory reset, a legacy device) changes
nothing about it until accepted: the homepage shows it as "wants to replace device X".

A new device id enrolling makes a pending device, within the registry's bounds
(:func:`~appliance.storage.devices.room_for_pending`: per source address and in all).

Errors (the registry's)::

    RegistryError
    ├── UnknownDevice        no enrollment for that id
    ├── DeclaredInConfig     a [[devices]] entry: its key is in the config
    └── EnrollmentChanged    not revealed yet, or another key than the one compared
"""

from __future__ import annotations

import sqlite3
from typing import Any, Final

import attrs

from appliance.storage.devices import (
    AdoptionState,
    DeclaredInConfig,
    Device,
    DeviceSource,
    RegistryError,
    UnknownDevice,
    get_device,
    new_pending,
    room_for_pending,
)
from appliance.storage.event_log import append as log_event

__all__ = ["Enrollment", "EnrollmentChanged", "Offered", "accept", "dismiss", "get_enrollment", "list_enrollments",
           "offer", "reveal"]

_COLUMNS: Final = ("device_id, kind, name, address, port, public_key, commitment, box_nonce, device_nonce, code, "
                   "created")


class EnrollmentChanged(RegistryError):
    pass


@attrs.frozen(kw_only=True)
class Enrollment:
    device_id: str
    kind: str
    name: str
    address: str
    port: int
    public_key: str
    commitment: str
    box_nonce: str
    device_nonce: str | None
    code: str | None
    created: float

    def as_dict(self) -> dict[str, Any]:
        """What the admin sees (the nonces and commitment stay inside)."""
        return {"device_id": self.device_id, "kind": self.kind, "name": self.name, "address": self.address,
                "port": self.port, "public_key": self.public_key, "code": self.code, "created": self.created}


@attrs.frozen(kw_only=True)
class Offered:
    """What :func:`offer` did: ``refused`` says why nothing was recorded ("full",
    "address_full", "config"); ``replaces`` is the device the enrollment would change."""

    enrollment: Enrollment | None
    created_device: bool = False
    replaces: Device | None = None
    refused: str | None = None


def _enrollment(row: sqlite3.Row) -> Enrollment:
    return Enrollment(**{k: row[k] for k in row.keys()})  # noqa: SIM118  # sqlite3.Row is no mapping


def get_enrollment(conn: sqlite3.Connection, device_id: str) -> Enrollment | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM enrollments WHERE device_id = ?", (device_id,)).fetchone()
    return None if row is None else _enrollment(row)


def list_enrollments(conn: sqlite3.Connection) -> dict[str, Enrollment]:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM enrollments ORDER BY device_id").fetchall()
    return {r["device_id"]: _enrollment(r) for r in rows}


def offer(conn: sqlite3.Connection, enrollment: Enrollment) -> Offered:
    """Record ``enrollment`` (replacing an earlier one for the same id), making a pending
    device for a new id if there is room."""
    device = get_device(conn, enrollment.device_id)
    created = False
    if device is None:
        refused = room_for_pending(conn, enrollment.address)
        if refused is not None:
            return Offered(enrollment=None, refused=refused)
        new_pending(conn, device_id=enrollment.device_id, kind=enrollment.kind, name=enrollment.name,
                    address=enrollment.address, port=enrollment.port, now=enrollment.created)
        created = True
    elif device.source is DeviceSource.CONFIG:
        return Offered(enrollment=None, refused="config", replaces=device)
    else:
        conn.execute("UPDATE devices SET last_seen = ? WHERE id = ?", (enrollment.created, device.id))
    values = attrs.astuple(enrollment)
    conn.execute(f"INSERT OR REPLACE INTO enrollments ({_COLUMNS}) VALUES ({', '.join('?' * len(values))})", values)
    replaces = device if device is not None and (device.public_key or device.state is AdoptionState.ADOPTED) \
        else None
    return Offered(enrollment=enrollment, created_device=created, replaces=replaces)


def reveal(conn: sqlite3.Connection, device_id: str, device_nonce: str, code: str) -> None:
    """Record the device's revealed nonce and the code (checked by the caller)."""
    conn.execute("UPDATE enrollments SET device_nonce = ?, code = ? WHERE device_id = ?", (device_nonce, code,
                                                                                             device_id))


def accept(conn: sqlite3.Connection, device_id: str, code: str | None, now: float) -> Device:
    """Adopt ``device_id`` with the key of its enrollment, which must show ``code`` (the
    code the admin compared: a later enrollment under the same id has another)."""
    enrollment = get_enrollment(conn, device_id)
    device = get_device(conn, device_id)
    if enrollment is None or device is None:
        raise UnknownDevice(f"no enrollment for device {device_id!r}")
    if device.source is DeviceSource.CONFIG:
        raise DeclaredInConfig(f"device {device_id!r} is declared in [[devices]]: its key is in the configuration")
    if enrollment.code is None:
        raise EnrollmentChanged(f"device {device_id!r} has not finished enrolling: no comparison code yet")
    if code != enrollment.code:
        raise EnrollmentChanged(f"device {device_id!r} enrolled again: its code is now another; compare the new "
                                "code on the homepage with the device's screen")
    conn.execute("UPDATE devices SET kind = ?, name = ?, address = ?, port = ?, state = 'adopted', public_key = ?, "
                 "legacy = 0, state_changed = ?, last_seen = ? WHERE id = ?",
                 (enrollment.kind, enrollment.name, enrollment.address, enrollment.port, enrollment.public_key, now,
                  now, device_id))
    conn.execute("DELETE FROM enrollments WHERE device_id = ?", (device_id,))
    log_event(conn, "device.adopted", {"device_id": device_id, "kind": enrollment.kind, "name": enrollment.name,
                                       "source": "enrollment"}, now=now, device_id=device_id)
    adopted = get_device(conn, device_id)
    assert adopted is not None
    return adopted


def dismiss(conn: sqlite3.Connection, device_id: str) -> bool:
    """Forget the enrollment of ``device_id`` (the device itself is unchanged)."""
    return conn.execute("DELETE FROM enrollments WHERE device_id = ?", (device_id,)).rowcount > 0

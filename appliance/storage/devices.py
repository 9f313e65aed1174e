"""The device registry: every device the box knows, and whether it is adopted.

A valid discovery probe creates a device (``pending``) or refreshes it; an admin adopts
or rejects it; devices declared in the config (``[[devices]]``) are ``adopted`` from the
start and the config stays their source of truth (a probe refreshes only ``last_seen``;
an admin cannot change their state -- the config file does). The dispatcher pushes
commands to :func:`list_adopted` devices that hold a key (docs/device-api.md).

An unsigned probe only says "still here": it refreshes ``last_seen`` and never changes a
known device's address, port, kind or name (anyone on the LAN can send one, with any id).
Only a probe signed with the device's own key (``signed=True``, checked by the caller)
moves a device; an enrollment the admin accepts sets where it is.

``public_key`` is the X25519 public key (hex) the device enrolled with and an admin
accepted; ``legacy`` marks a device adopted before the box had enrollment: it keeps its
commands, unauthenticated, until it enrolls or an admin ends that (``end_legacy``).

Functions take a connection and run inside the caller's transaction
(``runtime.db.write(fn)`` / ``runtime.db.read(fn)``); callers notify
``runtime.device_changes`` when a function reports a change. A refresh of ``last_seen``
alone is not a change: nothing a dispatcher does depends on it.

Bounds: at most :data:`MAX_PENDING` pending devices, and at most
:data:`MAX_PENDING_PER_ADDRESS` from one source address. When full, a new device is
refused and counted, never let in by evicting one already waiting (forged probes from
many addresses must not push a genuine pending device out). Pending devices not heard
from for :data:`PENDING_RETENTION_S` are pruned.

Errors::

    RegistryError
    ├── UnknownDevice      no device with that id
    └── DeclaredInConfig   the device comes from [[devices]]; change the config instead
"""

from __future__ import annotations

import enum
import sqlite3
import time
from collections.abc import Iterable
from typing import Any, Final

import attrs

from appliance.config import DeviceDecl
from appliance.storage.event_log import append as log_event

__all__ = [
    "MAX_PENDING",
    "MAX_PENDING_PER_ADDRESS",
    "PENDING_RETENTION_S",
    "AdoptionState",
    "DeclaredInConfig",
    "Device",
    "DeviceSource",
    "ProbeResult",
    "RegistryError",
    "UnknownDevice",
    "end_legacy",
    "get_device",
    "list_adopted",
    "list_devices",
    "new_pending",
    "prune_pending",
    "record_probe",
    "room_for_pending",
    "set_state",
    "sync_declared",
]

# A shop has tens of devices; 256 undecided ones is already a flood, not a shop.
MAX_PENDING: Final = 256
# One address is one device, or a tablet running a till and a kiosk app: a few, not tens.
MAX_PENDING_PER_ADDRESS: Final = 4
# A pending device nobody adopted and that went quiet for a week is gone.
PENDING_RETENTION_S: Final = 7 * 86400.0


class RegistryError(Exception):
    """A registry operation that cannot be done; the message is for a person."""


class UnknownDevice(RegistryError, LookupError):
    pass


class DeclaredInConfig(RegistryError):
    pass


class AdoptionState(enum.StrEnum):
    PENDING = "pending"
    ADOPTED = "adopted"
    REJECTED = "rejected"


class DeviceSource(enum.StrEnum):
    DISCOVERY = "discovery"  # a probe on UDP 57854
    CONFIG = "config"  # [[devices]] in the configuration file


@attrs.frozen(kw_only=True)
class Device:
    """One device of the registry. Times are Unix seconds; ``last_seen`` is None for a
    declared device that never probed."""

    id: str
    kind: str
    name: str
    address: str
    port: int
    state: AdoptionState
    source: DeviceSource
    first_seen: float
    last_seen: float | None
    state_changed: float
    public_key: str | None = None
    legacy: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "name": self.name, "address": self.address, "port": self.port,
                "state": str(self.state), "source": str(self.source), "first_seen": self.first_seen,
                "last_seen": self.last_seen, "state_changed": self.state_changed, "public_key": self.public_key,
                "legacy": self.legacy}


@attrs.frozen(kw_only=True)
class ProbeResult:
    """What a probe did: ``changed`` is True when more than ``last_seen`` moved (the
    device is new, or a signed probe changed its kind, name, address or port);
    ``refused`` says why a new device was not recorded ("full", "address_full"), and
    ``ignored`` is True when an unsigned probe asked to move a known device."""

    device: Device | None
    created: bool
    changed: bool
    refused: str | None = None
    ignored: bool = False


_COLUMNS: Final = ("id, kind, name, address, port, state, source, first_seen, last_seen, state_changed, "
                   "public_key, legacy")


def _device(row: sqlite3.Row) -> Device:
    return Device(id=row["id"], kind=row["kind"], name=row["name"], address=row["address"], port=row["port"],
                  state=AdoptionState(row["state"]), source=DeviceSource(row["source"]),
                  first_seen=row["first_seen"], last_seen=row["last_seen"], state_changed=row["state_changed"],
                  public_key=row["public_key"], legacy=bool(row["legacy"]))


def get_device(conn: sqlite3.Connection, device_id: str) -> Device | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM devices WHERE id = ?", (device_id,)).fetchone()
    return None if row is None else _device(row)


def list_devices(conn: sqlite3.Connection) -> list[Device]:
    """Every device: adopted first, then pending, then rejected; by id within each."""
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM devices ORDER BY "
        "CASE state WHEN 'adopted' THEN 0 WHEN 'pending' THEN 1 ELSE 2 END, id"
    ).fetchall()
    return [_device(r) for r in rows]


def list_adopted(conn: sqlite3.Connection) -> list[Device]:
    """The devices the box pushes commands to, by id."""
    rows = conn.execute(f"SELECT {_COLUMNS} FROM devices WHERE state = 'adopted' ORDER BY id").fetchall()
    return [_device(r) for r in rows]


def _insert(conn: sqlite3.Connection, device: Device) -> None:
    conn.execute(
        f"INSERT INTO devices ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (device.id, device.kind, device.name, device.address, device.port, str(device.state), str(device.source),
         device.first_seen, device.last_seen, device.state_changed, device.public_key, int(device.legacy)),
    )


def _log(conn: sqlite3.Connection, type: str, device_id: str, data: dict[str, Any], *,
         now: float | None = None) -> None:
    log_event(conn, type, {"device_id": device_id, **data}, now=time.time() if now is None else now,
              device_id=device_id)


def room_for_pending(conn: sqlite3.Connection, address: str) -> str | None:
    """None if a new pending device from ``address`` fits, else why not ("full",
    "address_full"). Nothing already waiting is ever dropped to make room."""
    if conn.execute("SELECT count(*) FROM devices WHERE state = 'pending'").fetchone()[0] >= MAX_PENDING:
        return "full"
    from_there = conn.execute("SELECT count(*) FROM devices WHERE state = 'pending' AND address = ?",
                              (address,)).fetchone()[0]
    return "address_full" if from_there >= MAX_PENDING_PER_ADDRESS else None


def new_pending(conn: sqlite3.Connection, *, device_id: str, kind: str, name: str, address: str, port: int,
                now: float) -> Device:
    device = Device(id=device_id, kind=kind, name=name, address=address, port=port, state=AdoptionState.PENDING,
                    source=DeviceSource.DISCOVERY, first_seen=now, last_seen=now, state_changed=now)
    _insert(conn, device)
    _log(conn, "device.discovered", device_id, {"kind": kind, "name": name, "address": address}, now=now)
    return device


def record_probe(
    conn: sqlite3.Connection, *, device_id: str, kind: str, name: str, address: str, port: int, now: float,
    signed: bool = False,
) -> ProbeResult:
    """Create (pending, if there is room) or refresh the device a valid probe speaks for.

    ``signed``: the caller checked the probe's signature with this device's key; only
    then may it change the device's address, port, kind or name."""
    old = get_device(conn, device_id)
    if old is None:
        refused = room_for_pending(conn, address)
        if refused is not None:
            return ProbeResult(device=None, created=False, changed=False, refused=refused)
        device = new_pending(conn, device_id=device_id, kind=kind, name=name, address=address, port=port, now=now)
        return ProbeResult(device=device, created=True, changed=True)
    wanted = (kind, name, address, port)
    if old.source is DeviceSource.CONFIG or not signed:
        # The config is the source of truth for a declared device; an unsigned probe could
        # come from anyone on the LAN.
        new = attrs.evolve(old, last_seen=now)
    else:
        new = attrs.evolve(old, kind=kind, name=name, address=address, port=port, last_seen=now)
    conn.execute("UPDATE devices SET kind = ?, name = ?, address = ?, port = ?, last_seen = ? WHERE id = ?",
                 (new.kind, new.name, new.address, new.port, new.last_seen, new.id))
    changed = (new.kind, new.name, new.address, new.port) != (old.kind, old.name, old.address, old.port)
    ignored = not changed and wanted != (old.kind, old.name, old.address, old.port) \
        and old.source is not DeviceSource.CONFIG
    return ProbeResult(device=new, created=False, changed=changed, ignored=ignored)


def end_legacy(conn: sqlite3.Connection, device_id: str | None, now: float) -> list[str]:
    """End the unauthenticated grace of one legacy device (or all): they get no more
    commands until they enroll. Returns the ids changed."""
    rows = conn.execute("SELECT id FROM devices WHERE legacy = 1 AND (? IS NULL OR id = ?) ORDER BY id",
                        (device_id, device_id)).fetchall()
    ids = [r["id"] for r in rows]
    conn.executemany("UPDATE devices SET legacy = 0, state_changed = ? WHERE id = ?", [(now, i) for i in ids])
    return ids


def set_state(conn: sqlite3.Connection, device_id: str, state: AdoptionState, now: float) -> tuple[Device, bool]:
    """Adopt or reject (or send back to pending) a device; returns it and whether it changed."""
    old = get_device(conn, device_id)
    if old is None:
        raise UnknownDevice(f"no device {device_id!r} in the registry")
    if old.source is DeviceSource.CONFIG:
        raise DeclaredInConfig(f"device {device_id!r} is declared in the configuration ([[devices]]); "
                               "remove it there to stop the box using it")
    if old.state is state:
        return old, False
    if state is AdoptionState.REJECTED:
        # Rejected or revoked: the key the device had is no longer trusted, for anything.
        conn.execute("DELETE FROM enrollments WHERE device_id = ?", (device_id,))
        conn.execute("UPDATE devices SET state = ?, state_changed = ?, public_key = NULL, legacy = 0 WHERE id = ?",
                     (str(state), now, device_id))
        _log(conn, f"device.{state}", device_id, {"kind": old.kind, "name": old.name}, now=now)
        return attrs.evolve(old, state=state, state_changed=now, public_key=None, legacy=False), True
    conn.execute("UPDATE devices SET state = ?, state_changed = ? WHERE id = ?", (str(state), now, device_id))
    _log(conn, f"device.{state}", device_id, {"kind": old.kind, "name": old.name}, now=now)
    return attrs.evolve(old, state=state, state_changed=now), True


def sync_declared(conn: sqlite3.Connection, declared: Iterable[DeviceDecl], now: float) -> bool:
    """Make the registry hold exactly the declared devices as ``adopted`` config devices.

    A declared device already known from discovery becomes a config device (adopted); a
    config device no longer declared is removed (it would otherwise stay adopted with
    nobody able to change it). Returns whether anything changed.
    """
    changed = False
    wanted = {d.id: d for d in declared}
    for device_id in [r["id"] for r in conn.execute("SELECT id FROM devices WHERE source = 'config'")]:
        if device_id not in wanted:
            conn.execute("DELETE FROM devices WHERE id = ?", (device_id,))
            _log(conn, "device.removed", device_id, {"reason": "no longer declared in the configuration"}, now=now)
            changed = True
    for decl in wanted.values():
        old = get_device(conn, decl.id)
        name = decl.name or (old.name if old is not None else "") or decl.id
        if old is None:
            _insert(conn, Device(id=decl.id, kind=decl.kind, name=name, address=decl.address, port=decl.port,
                                 state=AdoptionState.ADOPTED, source=DeviceSource.CONFIG,
                                 first_seen=now, last_seen=None, state_changed=now))
            _log(conn, "device.adopted", decl.id, {"kind": decl.kind, "name": name, "source": "config"}, now=now)
            changed = True
            continue
        new = attrs.evolve(old, kind=decl.kind, name=name, address=decl.address, port=decl.port,
                           state=AdoptionState.ADOPTED, source=DeviceSource.CONFIG,
                           state_changed=now if old.state is not AdoptionState.ADOPTED else old.state_changed)
        if new != old:
            conn.execute(
                "UPDATE devices SET kind = ?, name = ?, address = ?, port = ?, state = 'adopted', "
                "source = 'config', state_changed = ? WHERE id = ?",
                (new.kind, new.name, new.address, new.port, new.state_changed, new.id),
            )
            if old.state is not AdoptionState.ADOPTED:
                _log(conn, "device.adopted", decl.id, {"kind": decl.kind, "name": name, "source": "config"}, now=now)
            changed = True
    return changed


def prune_pending(conn: sqlite3.Connection, now: float, retention_s: float = PENDING_RETENTION_S) -> list[str]:
    """Remove pending devices not heard from for ``retention_s``; returns their ids."""
    cutoff = now - retention_s
    rows = conn.execute("SELECT id FROM devices WHERE state = 'pending' AND last_seen < ? ORDER BY id",
                        (cutoff,)).fetchall()
    ids = [r["id"] for r in rows]
    conn.executemany("DELETE FROM devices WHERE id = ?", [(i,) for i in ids])
    conn.executemany("DELETE FROM enrollments WHERE device_id = ?", [(i,) for i in ids])
    for device_id in ids:
        _log(conn, "device.removed", device_id, {"reason": "pending and not heard from"}, now=now)
    return ids

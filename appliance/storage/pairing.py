"""The box's pairing with its store: the platform's token and the store's settings.

Kept as JSON in ``<storage.dir>/pairing.json``, mode 0600, replaced atomically (a crash
leaves the old pairing or the new one, never half of one). The whole pairing answer is
kept, so the services the store has (Service Bus queues, media, logs, support) and the
store secret (the discovery HMAC key) survive restarts.

Exceptions: :class:`PairingFileError` (the file exists but cannot be used).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from appliance.storage.secrets import write_secret

__all__ = ["PAIRING_FILE", "PairingFileError", "StoreLink", "file_stamp", "load_pairing", "remove_pairing",
           "save_pairing"]

PAIRING_FILE: Final = "pairing.json"
_VERSION: Final = 1


class PairingFileError(Exception):
    """The pairing file exists but is unreadable or not what this firmware wrote."""


@attrs.frozen(kw_only=True)
class StoreLink:
    """What pairing gave this box. ``needs_repair``: the platform refused the token (401
    or 403); cloud calls stop until the box is paired again, the LAN keeps working."""

    store_id: str
    token: str = attrs.field(repr=False)
    services: Mapping[str, Any] = attrs.field(repr=False, factory=dict)
    store_secret: str = attrs.field(repr=False, default="")
    paired_at: float = 0.0
    needs_repair: bool = False

    def service(self, name: str) -> Mapping[str, Any] | None:
        """One service's settings from pairing (``orders``, ``support``, ``media``, ``logs``)."""
        value = self.services.get(name)
        return value if isinstance(value, Mapping) else None


def save_pairing(state_dir: Path, link: StoreLink) -> None:
    data = {"version": _VERSION, "store_id": link.store_id, "token": link.token, "services": dict(link.services),
            "paired_at": link.paired_at, "needs_repair": link.needs_repair}
    write_secret(state_dir / PAIRING_FILE, json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_pairing(state_dir: Path) -> StoreLink | None:
    """The saved pairing, or None if the box was never paired."""
    path = state_dir / PAIRING_FILE
    try:
        raw = path.read_text("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise PairingFileError(f"cannot read {path}: {exc}") from exc
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise PairingFileError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("version") != _VERSION:
        raise PairingFileError(f"{path} is not a pairing file of this firmware")
    store_id, token, services = data.get("store_id"), data.get("token"), data.get("services")
    if not (isinstance(store_id, str) and store_id and isinstance(token, str) and token
            and isinstance(services, dict)):
        raise PairingFileError(f"{path} lacks store_id, token or services")
    secret = services.get("store_secret")
    paired_at = data.get("paired_at")
    return StoreLink(store_id=store_id, token=token, services=services,
                     store_secret=secret if isinstance(secret, str) else "",
                     paired_at=float(paired_at) if isinstance(paired_at, int | float) else 0.0,
                     needs_repair=data.get("needs_repair") is True)


def remove_pairing(state_dir: Path) -> bool:
    """Forget the pairing (the box was released); True if there was one."""
    try:
        os.unlink(state_dir / PAIRING_FILE)
    except FileNotFoundError:
        return False
    return True


def file_stamp(state_dir: Path) -> tuple[int, int, int] | None:
    """Identifies the pairing file's current version (inode, size, mtime), None if absent:
    the running box notices a pairing made by ``appliance pair`` in another process."""
    try:
        st = os.stat(state_dir / PAIRING_FILE)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)

"""Every secret the box knows, gathered in one place for redaction.

:data:`SOURCES` is the list: one line per kind of secret, each a function of
:class:`SecretContext` returning the values. A new kind of secret (a new key file, a new
pairing field) is one more line here; the log ring, the shipper, the bundle and the live
tail all redact with :func:`known_secrets` and need no change.

Reading never fails: a file that cannot be read gives no secrets from it (the shape rules
of :mod:`appliance.protocol.redact` still apply).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import attrs

from appliance.config import Config
from appliance.storage.pairing import PairingFileError, StoreLink, load_pairing
from appliance.storage.secrets import read_secret

__all__ = ["SOURCES", "SecretContext", "known_secrets", "secret_context"]


@attrs.frozen(kw_only=True)
class SecretContext:
    """What the sources read: the configuration, the admin token, the pairing."""

    config: Config
    admin_token: str = attrs.field(default="", repr=False)
    store: StoreLink | None = attrs.field(default=None, repr=False)


def _proxy_password(url: str) -> list[str]:
    try:
        parts = urlsplit(url)
        return [unquote(parts.password)] if parts.password else []
    except ValueError:
        return []


def _service(store: StoreLink | None, name: str, key: str) -> list[str]:
    service: Mapping[str, Any] | None = store.service(name) if store else None
    value = service.get(key) if service else None
    return [value] if isinstance(value, str) else []


SOURCES: Final[tuple[Callable[[SecretContext], Iterable[str]], ...]] = (
    lambda ctx: [ctx.admin_token, ctx.config.admin.token],
    lambda ctx: [ctx.store.token] if ctx.store else [],
    lambda ctx: [ctx.store.store_secret] if ctx.store else [],
    lambda ctx: [ctx.config.orders.sas_key, ctx.config.support.sas_key],
    lambda ctx: _service(ctx.store, "orders", "sas_key") + _service(ctx.store, "support", "sas_key"),
    lambda ctx: [ctx.config.logs.api_key, *_service(ctx.store, "logs", "api_key")],
    lambda ctx: _proxy_password(ctx.config.wan.proxy),
    # The box's X25519 private key (enrolled devices' keys are derived from it).
    lambda ctx: [_read(Path(ctx.config.storage.dir) / "box.key")],
    # Pre-shared keys of devices declared in [[devices]].
    lambda ctx: [d.key for d in ctx.config.devices],
    # Derived device keys are never stored; like any raw 32-byte key they are masked by
    # shape (64 hex or 44 base64 characters) wherever they would appear.
)


def known_secrets(ctx: SecretContext) -> frozenset[str]:
    """Every non-empty secret of every source."""
    return frozenset(value for source in SOURCES for value in source(ctx) if value)


def secret_context(config: Config) -> SecretContext:
    """The context from the state directory alone (the box may be stopped): the admin
    token file and the saved pairing. Blocking: call it from a thread or a command."""
    state = Path(config.storage.dir)
    try:
        store = load_pairing(state)
    except PairingFileError:
        store = None
    return SecretContext(config=config, admin_token=_read(state / "admin.token"), store=store)


def _read(path: Path) -> str:
    try:
        return read_secret(path) or ""
    except (OSError, UnicodeDecodeError):
        return ""

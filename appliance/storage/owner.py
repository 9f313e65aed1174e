"""The box's admin credential and where it came from (docs/retailer.md, "Who owns the box").

Three sources, the first present wins:

1. ``[admin] token`` in the configuration: pinned by whoever wrote the file (development,
   tests, a fleet tool). Pairing and the settings page then cannot change it.
2. ``<storage.dir>/owner.token`` (0600): the owner's credential, from the platform's
   pairing answer (the back office shows it to the store's owner) or set on the homepage.
3. ``<storage.dir>/admin.token`` (0600): made at first boot. Nobody can read it without a
   shell, so on a retailer's box it only matters until the box is paired.

Releasing the box (a file on the boot partition) removes the owner's credential and the
pairing: the box is unpaired again and the generated credential is back in effect.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Final

import attrs

from appliance.config import ADMIN_TOKEN_MIN
from appliance.protocol.text import Text
from appliance.storage.secrets import load_or_create_token, read_secret, write_secret

__all__ = ["GENERATED_FILE", "OWNER_FILE", "AdminCredential", "CredentialSource", "credential_problem", "forget_owner",
           "load_credential", "save_owner_token"]

OWNER_FILE: Final = "owner.token"
GENERATED_FILE: Final = "admin.token"
# An admin credential: long enough not to be guessed on a LAN (the configuration's own
# minimum), short enough to type.
MIN_CHARS: Final = ADMIN_TOKEN_MIN
MAX_CHARS: Final = 128


def credential_problem(token: str) -> str:
    """Why ``token`` cannot be an admin credential, in words; "" when it can."""
    if not MIN_CHARS <= len(token) <= MAX_CHARS:
        return Text("must be {low} to {high} characters long, got {count}", low=MIN_CHARS, high=MAX_CHARS,
                    count=len(token))
    if not all(33 <= ord(c) < 127 for c in token):
        return Text("may hold only printable ASCII letters, digits and signs, no spaces")
    return ""


class CredentialSource(enum.StrEnum):
    CONFIGURATION = "configuration"
    OWNER = "owner"
    GENERATED = "generated"


@attrs.frozen(kw_only=True)
class AdminCredential:
    token: str = attrs.field(repr=False)
    source: CredentialSource

    @property
    def pinned(self) -> bool:
        """Set in the configuration: pairing and the settings page leave it alone."""
        return self.source is CredentialSource.CONFIGURATION


def load_credential(state_dir: Path, configured: str = "") -> AdminCredential:
    """The credential in effect (see the module docstring); makes ``admin.token`` if needed."""
    if configured:
        return AdminCredential(token=configured, source=CredentialSource.CONFIGURATION)
    owner = read_secret(state_dir / OWNER_FILE)
    if owner:
        return AdminCredential(token=owner, source=CredentialSource.OWNER)
    return AdminCredential(token=load_or_create_token(state_dir / GENERATED_FILE), source=CredentialSource.GENERATED)


def save_owner_token(state_dir: Path, token: str) -> None:
    write_secret(state_dir / OWNER_FILE, token + "\n")


def forget_owner(state_dir: Path) -> bool:
    """Remove the owner's credential; True if there was one."""
    try:
        os.unlink(state_dir / OWNER_FILE)
    except FileNotFoundError:
        return False
    return True

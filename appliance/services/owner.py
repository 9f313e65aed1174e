"""The admin credential in effect in the running box: the one writer of ``runtime.admin``.

Where it comes from and in which order: ``appliance/storage/owner.py``. Pairing brings the
owner's credential (``services/pairing.py`` calls :func:`reload_credential`); the
homepage's Settings card changes it (:func:`change_admin_token`).

Exceptions: :class:`CredentialRefused` (message for the person; nothing was changed).
"""

from __future__ import annotations

from pathlib import Path

import trio

from appliance.protocol.text import Text
from appliance.services.runtime import Runtime
from appliance.storage.owner import (
    AdminCredential,
    CredentialSource,
    credential_problem,
    load_credential,
    save_owner_token,
)

__all__ = ["CredentialRefused", "change_admin_token", "reload_credential"]


class CredentialRefused(Exception):
    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("; ".join(errors))


async def reload_credential(runtime: Runtime) -> None:
    """Put the admin credential saved in the state directory in effect."""
    runtime.admin = await trio.to_thread.run_sync(load_credential, Path(runtime.config.storage.dir),
                                                  runtime.config.admin.token)


async def change_admin_token(runtime: Runtime, new: str, confirm: str) -> None:
    """Make ``new`` the admin credential (the owner's), at once. The back office's copy is
    then out of date; pairing again hands out a new one."""
    if runtime.admin.pinned:
        raise CredentialRefused([Text("admin token: set in the configuration file ([admin] token); change it there")])
    if new != confirm:
        raise CredentialRefused([Text("admin token: the two new tokens differ")])
    if problem := credential_problem(new):
        raise CredentialRefused([Text("admin token: {problem}", problem=problem)])
    await trio.to_thread.run_sync(save_owner_token, Path(runtime.config.storage.dir), new)
    runtime.admin = AdminCredential(token=new, source=CredentialSource.OWNER)

"""Pairing the box with its store, and keeping ``runtime.store`` up to date.

- :func:`pair_box` calls ``POST /v1/appliances/pair`` and saves the answer (0600), and the
  owner's admin credential the answer carries (``storage/owner.py``). Used by
  ``appliance pair CODE`` (its own process) and the homepage form (in the running box).
- :func:`pair_from_web`: who may pair (docs/retailer.md, "Who owns the box"). A box that
  was never paired takes a valid code from anyone on the LAN: the one-time code from the
  back office is itself the proof of authority. A box that is paired (or was: "pair
  again", an unreadable pairing file, an owner's credential) needs the admin credential.
  Only the boot partition returns a paired box to unpaired (``services/setup.py``).
- :func:`run_pairing`, a service started before the listeners and discovery: loads the
  saved pairing into ``runtime.store`` before it reports ready, then notices a pairing
  saved by another process (``appliance pair``) within :data:`WATCH_INTERVAL_S`.
- :func:`mark_repair_needed`: the platform refused the token (401/403); the box shows
  "pair again", stops calling the platform, and keeps serving the LAN.

- The boot partition's setup file (``appliance/setupfile.py``) hands over a release and a
  pairing code: :func:`run_pairing` releases the box before it loads the pairing (the
  events still waiting for the old store are held, never sent to the next one), then pairs
  with the code, retrying while the platform cannot be reached.

Every change of ``runtime.store`` notifies ``runtime.pairing_changes``.

Exceptions: :class:`PairingFailed` (message for the person pairing; ``link`` says where the
network path broke when it did). The web layer's own refusal passes through
:func:`pair_from_web` unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Final

import attrs
import httpx
import trio

from appliance import __version__
from appliance.config import Config
from appliance.protocol.backoff import Backoff
from appliance.protocol.sync import SyncProtocolError, http_failure, parse_error, parse_pairing
from appliance.protocol.text import Text
from appliance.protocol.wan import Hop, HopFailure
from appliance.services.owner import reload_credential
from appliance.services.runtime import Runtime
from appliance.services.wan import WanConfigError, client_for, close_client, cloud_route, locate_failure
from appliance.setupfile import HANDOFF_FILE, Handoff
from appliance.storage import DATABASE_FILE, Database
from appliance.storage.events import hold_unsent
from appliance.storage.owner import CredentialSource, forget_owner, save_owner_token
from appliance.storage.pairing import (
    PairingFileError,
    StoreLink,
    file_stamp,
    load_pairing,
    remove_pairing,
    save_pairing,
)
from appliance.storage.secrets import write_secret

__all__ = ["WATCH_INTERVAL_S", "PairingFailed", "describe", "is_claimed", "mark_repair_needed", "pair_box",
           "pair_from_web", "run_pairing", "set_store"]

log = logging.getLogger(__name__)

# How often the running box looks for a pairing saved by `appliance pair`.
WATCH_INTERVAL_S: Final = 2.0
# The contract's bound on the pairing code and ids (docs/cloud-contract.md).
CODE_MAX_CHARS: Final = 128
# A pairing answer is a few hundred bytes of settings.
ANSWER_MAX_BYTES: Final = 65536


class PairingFailed(Exception):
    """Pairing did not happen; the message says why in words for the person pairing."""

    def __init__(self, message: str, *, link: HopFailure | None = None) -> None:
        self.message, self.link = message, link
        super().__init__(message)


def _check_code(code: str) -> str:
    code = code.strip()
    if not code:
        raise PairingFailed(Text("enter the pairing code shown in the back office"))
    if len(code) > CODE_MAX_CHARS or not code.isprintable():
        raise PairingFailed(Text("that is not a pairing code (at most {count} printable characters)",
                                 count=CODE_MAX_CHARS))
    return code


async def pair_box(config: Config, *, appliance_id: str, code: str, now: float | None = None) -> StoreLink:
    """Pair with the platform and save the pairing (replacing any earlier one).

    The call runs under one deadline (connect + read timeouts). Cancellation before the
    answer leaves the old pairing; the file is replaced atomically.
    """
    code = _check_code(code)
    cloud = config.cloud
    url = cloud.api_url.rstrip("/") + "/v1/appliances/pair"
    try:
        target = cloud_route(config)
        client = client_for(target, connect_timeout_s=cloud.connect_timeout_s, read_timeout_s=cloud.read_timeout_s)
        proxy = target.proxy
    except WanConfigError as exc:
        raise PairingFailed(str(exc)) from exc
    body = {"code": code, "appliance_id": appliance_id, "firmware": __version__}
    try:
        try:
            with trio.fail_after(cloud.connect_timeout_s + cloud.read_timeout_s):
                response = await client.post("/v1/appliances/pair", json=body)
        finally:
            await close_client(client)
    except (httpx.HTTPError, trio.TooSlowError) as exc:
        if isinstance(exc, httpx.HTTPError):
            link = locate_failure(exc, url=url, proxy=proxy)
        else:
            link = HopFailure.at(Hop.HTTP, httpx.URL(url).host, f"no answer from {cloud.api_url} in time")
        raise PairingFailed(Text("{message} ({fix})", message=link.message, fix=link.fix), link=link) from exc
    raw = response.content[:ANSWER_MAX_BYTES]
    if response.status_code != 200:
        code_, reason = parse_error(raw)
        if response.status_code in (403, 404) and code_.startswith("pair_code"):
            raise PairingFailed(reason or Text("the platform refused the code ({code})", code=code_))
        link = http_failure(httpx.URL(url).host, response.status_code, code=code_, reason=reason)
        raise PairingFailed(Text("{message} ({fix})", message=link.message, fix=link.fix), link=link)
    try:
        answer = parse_pairing(raw)
    except SyncProtocolError as exc:
        raise PairingFailed(Text("the platform's pairing answer is not usable: {error}", error=str(exc))) from exc
    link_ = StoreLink(store_id=answer.store_id, token=answer.token, services=answer.services,
                      store_secret=answer.store_secret, paired_at=time.time() if now is None else now)
    state_dir = Path(config.storage.dir)
    await trio.to_thread.run_sync(_hold_other_stores_events, state_dir, answer.store_id, link_.paired_at)
    if answer.admin_token:
        # Before the pairing: a crash between the two leaves a box that counts as owned and
        # whose credential the back office already shows, never a paired box whose
        # credential nobody knows.
        await trio.to_thread.run_sync(save_owner_token, state_dir, answer.admin_token)
    else:
        log.warning("the pairing answer carries no admin credential: the box keeps the one it had")
    await trio.to_thread.run_sync(save_pairing, state_dir, link_)
    log.info("paired with store %s", answer.store_id)
    return link_


def _hold_other_stores_events(state_dir: Path, new_store: str, now: float) -> None:
    """Before the box speaks for ``new_store``: hold the events still waiting for the store
    it was paired with before, so a box moved between shops never reports one shop's sales
    in the other's books. They stay in the database, shown with the reason, for support."""
    try:
        old = load_pairing(state_dir)
    except PairingFileError:
        old = None  # an unreadable pairing: nothing tells which store the events were for
    if old is None or old.store_id == new_store:
        return
    db = Database.open_sync(state_dir / DATABASE_FILE)
    try:
        held = db.write_sync(partial(hold_unsent, reason=f"held: recorded for store {old.store_id}; the box was "
                                     f"paired with store {new_store} before it went up", now=now))
    finally:
        db.close()
    if held:
        log.warning("paired with store %s: %d event(s) recorded for store %s are held, not sent", new_store,
                    held, old.store_id)


def set_store(runtime: Runtime, link: StoreLink | None) -> None:
    """Make ``link`` the box's pairing and tell every watcher."""
    runtime.set_store(link)


async def mark_repair_needed(runtime: Runtime, refused: StoreLink) -> None:
    """The platform refused ``refused``'s token: remember it (across restarts) and say so.
    A newer pairing made meanwhile is left alone: pairing again revokes the old token, so
    the sync loops see 401s while it runs; under the pairing lock they wait for it to end,
    then find the new token and leave the new pairing file alone."""
    async with runtime.pairing_lock:
        if runtime.store is None or runtime.store.token != refused.token or runtime.store.needs_repair:
            return
        link = attrs.evolve(refused, needs_repair=True)
        log.warning("the platform refused the box's token for store %s: pair the box again", refused.store_id)
        try:
            await trio.to_thread.run_sync(save_pairing, Path(runtime.config.storage.dir), link)
        except OSError as exc:  # the state in memory is what matters now; the next start learns it again
            log.error("cannot save the pairing state: %s", exc)
        set_store(runtime, link)


def is_claimed(runtime: Runtime) -> bool:
    """Paired, or was (pair again, an unreadable pairing file, an owner's credential):
    pairing again then needs the admin credential."""
    return (runtime.store is not None or bool(runtime.sync_status.pairing_problem)
            or runtime.admin.source is CredentialSource.OWNER)


async def pair_from_web(runtime: Runtime, code: str, *, check_admin: Callable[[], None] | None = None) -> StoreLink:
    """Pair the running box (the homepage form, the JSON route): save, then switch every
    service and the admin credential over.

    ``check_admin`` raises the caller's refusal when the request lacks the admin
    credential; it is called only when the box is claimed, under the pairing lock, so two
    strangers racing for an unpaired box cannot both pass the "unpaired" check. The web
    routes always pass one; None is for the box's own callers (the demo, tests)."""
    async with runtime.pairing_lock:
        if is_claimed(runtime) and check_admin is not None:
            check_admin()
        link = await pair_box(runtime.config, appliance_id=runtime.appliance_id, code=code)
        await reload_credential(runtime)
        set_store(runtime, link)
    return link


def _load(state_dir: Path) -> tuple[StoreLink | None, str]:
    try:
        return load_pairing(state_dir), ""
    except PairingFileError as exc:
        return None, f"{exc}; pair the box again"


def _write_handoff(state_dir: Path, handoff: Handoff | None) -> None:
    if handoff is None:
        (state_dir / HANDOFF_FILE).unlink(missing_ok=True)
    else:
        write_secret(state_dir / HANDOFF_FILE, handoff.to_json())


async def _release(runtime: Runtime, state_dir: Path) -> None:
    """The boot partition said so: forget the store and the owner's credential."""
    old = (await trio.to_thread.run_sync(_load, state_dir))[0]
    if old is not None:
        held = await runtime.db.write(partial(
            hold_unsent, reason=f"held: recorded for store {old.store_id}; the box was released from it on its "
                                "boot partition before they went up", now=time.time()))
        log.warning("released from store %s on the boot partition; %d event(s) for it held, not sent",
                    old.store_id, held)
    await trio.to_thread.run_sync(remove_pairing, state_dir)
    await trio.to_thread.run_sync(forget_owner, state_dir)
    log.warning("the box is unpaired (released on its boot partition)")


async def _pair_with_setup_code(runtime: Runtime, state_dir: Path, handoff: Handoff) -> None:
    """Pair with the setup file's code, retrying (capped backoff) while the platform cannot
    be reached. A refusal (unknown or used code) is kept for the homepage; a person acts."""
    cloud = runtime.config.cloud
    backoff = Backoff(cloud.backoff_initial_s, cloud.backoff_max_s)
    while True:
        try:
            async with runtime.pairing_lock:
                link = await pair_box(runtime.config, appliance_id=runtime.appliance_id, code=handoff.code)
                await reload_credential(runtime)
                set_store(runtime, link)
        except PairingFailed as exc:
            if exc.link is None:
                log.error("the pairing code from the setup file was refused: %s", exc.message)
                await trio.to_thread.run_sync(_write_handoff, state_dir, Handoff(
                    problem=f"the pairing code from the setup file was refused: {exc.message}"))
                return
            delay = backoff.next_delay()
            log.warning("pairing with the setup file's code: %s; trying again in %.0f s", exc.message, delay)
            await trio.to_thread.run_sync(_write_handoff, state_dir, attrs.evolve(
                handoff, problem=f"not paired yet: {exc.message} (trying again)"))
            await trio.sleep(delay)
        else:
            await trio.to_thread.run_sync(_write_handoff, state_dir, None)
            return


async def run_pairing(runtime: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Apply the setup file's release, load the saved pairing into ``runtime.store``, pair
    with the setup file's code if it gave one, and follow changes to the pairing file."""
    state_dir = Path(runtime.config.storage.dir)
    handoff = await trio.to_thread.run_sync(Handoff.read, state_dir)
    if handoff is not None and handoff.release:
        await _release(runtime, state_dir)
        handoff = attrs.evolve(handoff, release=False)  # done: a restart must not release the next pairing
        await trio.to_thread.run_sync(_write_handoff, state_dir, handoff if handoff.code or handoff.problem else None)
        await reload_credential(runtime)
    async with trio.open_nursery() as nursery:
        await nursery.start(_follow_pairing, runtime, state_dir)
        task_status.started()
        if handoff is not None and handoff.code:
            await _pair_with_setup_code(runtime, state_dir, handoff)


async def _follow_pairing(runtime: Runtime, state_dir: Path, *,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    stamp = await trio.to_thread.run_sync(file_stamp, state_dir)
    link, problem = await trio.to_thread.run_sync(_load, state_dir)
    runtime.sync_status.pairing_problem = problem
    if link is not None:
        log.info("paired with store %s%s", link.store_id, " (pair again: token refused)" if link.needs_repair else "")
    set_store(runtime, link)
    task_status.started()
    while True:
        await trio.sleep(WATCH_INTERVAL_S)
        current = await trio.to_thread.run_sync(file_stamp, state_dir)
        if current == stamp:
            continue
        stamp = current
        link, problem = await trio.to_thread.run_sync(_load, state_dir)
        runtime.sync_status.pairing_problem = problem
        old = runtime.store
        if link is None and old is None:
            continue
        if (link is None or old is None or link.token != old.token or link.needs_repair != old.needs_repair
                or link.services != old.services):
            log.info("pairing file changed: %s", f"store {link.store_id}" if link else "unpaired")
            await reload_credential(runtime)  # `appliance pair` saved the owner's credential too
            set_store(runtime, link)


def describe(link: StoreLink | None) -> dict[str, object]:
    """The pairing state for /api/status (never the token or secrets)."""
    if link is None:
        return {"state": "unpaired", "store_id": None}
    services = sorted(k for k, v in link.services.items() if k != "store_secret" and v)
    return {"state": "repair_needed" if link.needs_repair else "paired", "store_id": link.store_id,
            "paired_at": link.paired_at, "services": services}

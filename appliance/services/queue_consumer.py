"""One trio task consuming one Service Bus queue in peek-lock: the machinery shared by the
online orders receiver and the remote support channel.

:func:`consume` loops for ever: it asks ``settings()`` for the link's options (from the
pairing and the config; a string instead says why there is no link yet, and it waits for
the pairing to change), opens the link, receives small batches with a short wait, hands
each message to ``handle`` and settles it as ``handle`` says: complete, dead-letter
with a reason, or abandon. When the pairing changes and the options with it, the link is
closed and reopened with the new ones.

Failures: a :class:`~appliance.services.servicebus.QueueLinkError` (network, namespace down)
closes the link and retries after a capped, jittered backoff; a refused key
(``LinkAuthError``) does the same on a longer backoff and says so plainly; options that
cannot work (``LinkConfigError``) wait for the pairing or the config to change. A lost
lock while settling is counted and passed over: the message comes back, and handlers
are idempotent on ``message_id``. Anything else ``handle`` raises ends the task (the
supervisor restarts the service; unsettled messages come back when the link closes).

Cancellation: the receive in flight finishes first (at most ``max_wait_s``; see
``servicebus.AsyncQueueLink``), then the link is closed in a shielded scope bounded by
:data:`CLOSE_TIMEOUT_S` (the SDK's close drains for about two socket polls).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

import attrs
import trio

from appliance.protocol.backoff import Backoff
from appliance.services.runtime import Runtime
from appliance.services.servicebus import (
    AsyncQueueLink,
    LinkAuthError,
    LinkConfigError,
    LinkOptions,
    LockLostError,
    QueueLinkError,
    ReceivedMessage,
    open_queue_link,
)
from appliance.services.state import QueueLinkStatus, QueuePhase

__all__ = ["CLOSE_TIMEOUT_S", "Disposition", "OpenLink", "Settle", "consume"]

log = logging.getLogger(__name__)

# Messages asked for per receive: each is held locked until settled, and one order's
# transaction is a few milliseconds, so a small batch never outlives its lock (60 s).
# The SDK keeps a receive open until the batch is full or a further wait has passed, so
# an idle link asks for one message (it returns as soon as one arrives: measured about
# 5 s for a lone message with 16 asked, under 0.3 s with 1), and a full batch doubles the
# next request up to this bound (a backlog drains in batches).
RECEIVE_BATCH: Final = 16
# Closing the SDK's receiver drains the link (about 2 s measured); give it a margin.
CLOSE_TIMEOUT_S: Final = 10.0
BACKOFF_INITIAL_S: Final = 1.0
BACKOFF_MAX_S: Final = 60.0
# A refused key does not fix itself quickly; retry rarely (a new pairing retries at once).
AUTH_BACKOFF_INITIAL_S: Final = 30.0
AUTH_BACKOFF_MAX_S: Final = 600.0

OpenLink = Callable[[LinkOptions], AsyncQueueLink]


class Disposition(enum.Enum):
    COMPLETE = "complete"
    DEAD_LETTER = "dead_letter"
    ABANDON = "abandon"


@attrs.frozen(kw_only=True)
class Settle:
    """What to do with a message once handled."""

    verdict: Disposition = Disposition.COMPLETE
    reason: str = ""
    description: str = ""


async def _wait_for_change(runtime: Runtime, seen: int, delay_s: float | None = None) -> None:
    with trio.move_on_after(delay_s if delay_s is not None else float("inf")):
        await runtime.pairing_changes.wait(seen)


async def _close(link: AsyncQueueLink, name: str) -> None:
    with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
        try:
            await link.aclose()
        except QueueLinkError as exc:  # the link is going away anyway; its messages come back
            log.info("%s: closing the Service Bus link: %s", name, exc)


async def _settle(link: AsyncQueueLink, state: QueueLinkStatus, msg: ReceivedMessage, settle: Settle) -> None:
    try:
        if settle.verdict is Disposition.DEAD_LETTER:
            await link.dead_letter(msg, settle.reason, settle.description)
            state.dead_lettered += 1
        elif settle.verdict is Disposition.ABANDON:
            await link.abandon(msg)
            state.abandoned += 1
        else:
            await link.complete(msg)
            state.completed += 1
    except LockLostError as exc:
        # Not settled: it comes back, and the handler will recognise it.
        state.locks_lost += 1
        log.warning("%s: message %s: %s", state.name, msg.message_id, exc)


async def _session(
    state: QueueLinkStatus,
    link: AsyncQueueLink,
    *,
    handle: Callable[[ReceivedMessage], Awaitable[Settle]],
    on_success: Callable[[], None],
    clock: Callable[[], float],
) -> None:
    """Receive and settle until cancelled or a QueueLinkError."""
    want = 1
    while True:
        batch = await link.receive(want)
        want = min(RECEIVE_BATCH, want * 2) if len(batch) >= want else 1
        if state.phase is not QueuePhase.CONNECTED:
            state.phase, state.connected_at, state.failing_since, state.next_try_at = (
                QueuePhase.CONNECTED, clock(), None, None)
            log.info("%s: connected to %s, queue %s", state.name, state.namespace, state.queue)
        on_success()
        for msg in batch:
            state.received += 1
            state.last_message_at = clock()
            settle = await handle(msg)
            await _settle(link, state, msg, settle)


async def consume(
    runtime: Runtime,
    state: QueueLinkStatus,
    *,
    settings: Callable[[], LinkOptions | str],
    handle: Callable[[ReceivedMessage], Awaitable[Settle]],
    open_link: OpenLink = open_queue_link,
    clock: Callable[[], float] = time.time,
) -> None:
    """Consume the queue ``settings()`` names, for ever (see the module docstring)."""
    backoff = Backoff(BACKOFF_INITIAL_S, BACKOFF_MAX_S)
    auth_backoff = Backoff(AUTH_BACKOFF_INITIAL_S, AUTH_BACKOFF_MAX_S)

    def succeeded() -> None:
        backoff.reset()
        auth_backoff.reset()

    while True:
        seen = runtime.pairing_changes.version
        options = settings()
        if isinstance(options, str):
            state.phase, state.detail, state.next_try_at = QueuePhase.UNCONFIGURED, options, None
            await _wait_for_change(runtime, seen)
            continue
        state.namespace, state.queue, state.detail = options.namespace, options.queue, ""
        if state.phase is not QueuePhase.RETRYING:
            state.phase = QueuePhase.CONNECTING
        try:
            link = open_link(options)
        except LinkConfigError as exc:
            state.record_failure(QueuePhase.CONFIG_ERROR, str(exc), clock(), None)
            log.error("%s: the Service Bus settings cannot work: %s", state.name, exc)
            await _wait_for_change(runtime, seen)
            continue
        error: QueueLinkError | None = None
        try:
            async with trio.open_nursery() as nursery:

                async def watch_settings(scope: trio.CancelScope, version: int, options: LinkOptions) -> None:
                    while True:
                        version = await runtime.pairing_changes.wait(version)
                        if settings() != options:
                            log.info("%s: the Service Bus settings changed: reconnecting", state.name)
                            scope.cancel()
                            return

                nursery.start_soon(watch_settings, nursery.cancel_scope, seen, options)
                try:
                    await _session(state, link, handle=handle, on_success=succeeded, clock=clock)
                except QueueLinkError as exc:
                    error = exc
                    nursery.cancel_scope.cancel()
        finally:
            await _close(link, state.name)
        if error is None:
            continue  # the settings changed: reopen at once
        now = clock()
        if isinstance(error, LinkAuthError):
            delay = auth_backoff.next_delay()
            message = (f"cannot authenticate to {options.namespace} (queue {options.queue}): the namespace "
                       f"refused the SAS key {options.sas_key_name!r}")
            state.record_failure(QueuePhase.AUTH_FAILED, message, now, now + delay)
            runtime.metrics.inc("servicebus_link_failures", link=state.name, kind="auth")
            log.error("%s: %s; check the pairing; next try in %.0f s", state.name, message, delay)
        else:
            delay = backoff.next_delay()
            state.record_failure(QueuePhase.RETRYING, str(error), now, now + delay)
            runtime.metrics.inc("servicebus_link_failures", link=state.name, kind="link")
            log.warning("%s: Service Bus link failed; next try in %.1f s: %s", state.name, delay, error)
        await _wait_for_change(runtime, seen, delay)

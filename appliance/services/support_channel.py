"""The remote support channel (docs/architecture.md §5): support staff reach the box through a Service
Bus queue on the second namespace (koostodesapp-ns), the box answers over HTTPS.

Off by default. It is switched on by ``[support] enabled = true`` (from the start) or by
an admin on the homepage (``POST /api/support-channel``), and turns itself off after
``[support] duration_s``; the homepage shows "enabled until HH:MM" or "off". While on,
the same consumer machinery as online orders (:mod:`appliance.services.queue_consumer`)
reads requests (:mod:`appliance.protocol.support`) from the queue pairing gives
(``services.support``; ``[support]`` values override), runs them, and sends each reply to
``POST /v1/appliances/{id}/support/{request_id}`` (docs/cloud-contract.md) through the
box's WAN client; the message is completed once the platform took the reply. A request
that does not parse is dead-lettered with the reason. A reply that cannot be sent is
abandoned after :data:`REPLY_RETRY_S` (Service Bus delivers it again; a request is safe
to run twice, and the platform keeps the first reply).

Requests: ``health`` (every health check), ``diagnostics`` (versions, uptime, services,
queue depths, last errors), ``resync`` (notifies ``runtime.resync_requests``; with
``full`` the next pull re-reads the snapshot), ``log_level`` (the root logger's level for
at most an hour, then back; also back when the channel turns off), ``bundle`` (the
diagnostics bundle of :mod:`appliance.services.bundle`, uploaded with ``PUT
/v1/appliances/{id}/support/{request_id}/bundle``; at most :data:`BUNDLE_MAX_BYTES`: a
larger one is built again with half the log records until it fits; the reply then says
what was uploaded).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Final

import httpx
import trio

from appliance import __version__
from appliance.protocol.health import Check, Status
from appliance.protocol.support import SupportKind, SupportRequest, SupportRequestError, parse_request
from appliance.protocol.text import Text
from appliance.services.bundle import bundle_of
from appliance.services.orders import link_options
from appliance.services.queue_consumer import Disposition, OpenLink, Settle, consume
from appliance.services.runtime import Runtime
from appliance.services.servicebus import ReceivedMessage, open_queue_link
from appliance.services.state import QueueLinkStatus, QueuePhase, SupportWindow
from appliance.services.wan import WanConfigError, client_for, cloud_route
from appliance.storage.catalog import require_snapshot
from appliance.storage.events import outbox_stats
from appliance.storage.meta import get_meta, set_meta

__all__ = ["REPLY_RETRY_S", "run_support", "switch_support"]

log = logging.getLogger(__name__)

# After a reply that could not be sent, wait this long before giving the request back.
REPLY_RETRY_S: Final = 5.0
# A reply is a health report or a summary: far under the contract's 1 MiB.
REPLY_MAX_BYTES: Final = 512 * 1024
# The contract's cap on an uploaded bundle (docs/cloud-contract.md, "Support bundles").
BUNDLE_MAX_BYTES: Final = 8 * 1024 * 1024
# A bundle upload may take a while on a slow uplink: 8 MiB at 1 Mbit/s is about 70 s.
BUNDLE_UPLOAD_TIMEOUT_S: Final = 300.0

Reply = Callable[[str, dict[str, Any]], Awaitable[None]]
Upload = Callable[[str, bytes], Awaitable[None]]


class ReplyFailed(Exception):
    """The platform did not take the reply."""


class _LogLevel:
    """Raises the root logger's level for a while; :meth:`restore` puts it back."""

    def __init__(self) -> None:
        self.saved: int | None = None
        self.scope: trio.CancelScope | None = None

    def restore(self) -> None:
        if self.scope is not None:
            self.scope.cancel()
            self.scope = None
        if self.saved is not None:
            logging.getLogger().setLevel(self.saved)
            log.info("support: log level back to %s", logging.getLevelName(self.saved))
            self.saved = None

    async def hold(self, level: str, duration_s: float, *, task_status: trio.TaskStatus[None]) -> None:
        root = logging.getLogger()
        self.restore()
        self.saved = root.level
        root.setLevel(level.upper())
        log.warning("support: log level %s for %g s", level, duration_s)
        with trio.CancelScope() as scope:
            self.scope = scope
            task_status.started()
            await trio.sleep(duration_s)
        if self.scope is scope:
            self.scope = None
            self.restore()


async def diagnostics(runtime: Runtime) -> dict[str, Any]:
    stats = await runtime.db.read(outbox_stats)
    board = runtime.device_links
    orders = runtime.orders_link
    return {
        "firmware": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "appliance_id": runtime.appliance_id,
        "uptime_s": round(runtime.uptime_s(), 1),
        "services": [s.as_dict() for s in runtime.board.all()],
        "queues": {"events_pending": stats.queued, "events_rejected": stats.rejected,
                   "device_commands_pending": sum(b.depth for b in board.backlog.values())},
        "orders_link": {"phase": str(orders.phase), "last_error": orders.last_error,
                        "received": orders.received, "dead_lettered": orders.dead_lettered},
        "last_errors": {s.name: s.last_error for s in runtime.board.all() if s.last_error},
    }


async def _call_platform(runtime: Runtime, method: str, path: str, *, content: bytes, content_type: str,
                         timeout_s: float) -> None:
    """One call to the sync API with the pairing's token; :class:`ReplyFailed` unless 200."""
    store = runtime.store
    if store is None or store.needs_repair:
        raise ReplyFailed("the box is not paired (or must be paired again): no way to reply")
    cloud = runtime.config.cloud
    try:
        client = client_for(cloud_route(runtime.config), connect_timeout_s=cloud.connect_timeout_s,
                            read_timeout_s=cloud.read_timeout_s)
    except WanConfigError as exc:
        raise ReplyFailed(str(exc)) from exc
    try:
        async with client:
            with trio.fail_after(timeout_s):
                answer = await client.request(method, path, content=content, headers={
                    "Authorization": f"Bearer {store.token}", "Content-Type": content_type})
    except (httpx.HTTPError, trio.TooSlowError) as exc:
        raise ReplyFailed(f"{type(exc).__name__}: {exc}") from exc
    if answer.status_code != 200:
        raise ReplyFailed(f"the platform answered {answer.status_code}: {answer.text[:200]}")


def _reply_via_wan(runtime: Runtime) -> Reply:
    async def reply(request_id: str, body: dict[str, Any]) -> None:
        content = json.dumps(body, separators=(",", ":"), default=str).encode()
        if len(content) > REPLY_MAX_BYTES:
            content = json.dumps({"status": body.get("status"), "error": "the reply was too big to send"}).encode()
        cloud = runtime.config.cloud
        await _call_platform(runtime, "POST", f"/v1/appliances/{runtime.appliance_id}/support/{request_id}",
                             content=content, content_type="application/json",
                             timeout_s=cloud.connect_timeout_s + cloud.read_timeout_s)

    return reply


def _upload_via_wan(runtime: Runtime) -> Upload:
    async def upload(request_id: str, data: bytes) -> None:
        await _call_platform(runtime, "PUT", f"/v1/appliances/{runtime.appliance_id}/support/{request_id}/bundle",
                             content=data, content_type="application/gzip", timeout_s=BUNDLE_UPLOAD_TIMEOUT_S)

    return upload


async def upload_bundle(runtime: Runtime, request_id: str, logs: int, upload: Upload) -> dict[str, Any]:
    """Build the bundle (halving the log records until it fits), upload it, say what went."""
    while True:
        data, manifest = await bundle_of(runtime, log_records=logs)
        if len(data) <= BUNDLE_MAX_BYTES or logs == 0:
            break
        logs //= 2
    if len(data) > BUNDLE_MAX_BYTES:
        return {"uploaded": False, "error": f"the bundle is {len(data)} bytes even without logs; the cap is "
                                            f"{BUNDLE_MAX_BYTES}"}
    await upload(request_id, data)
    return {"uploaded": True, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "log_records": logs,
            "parts": {name: part["status"] for name, part in manifest["parts"].items()}}


class SupportHandler:
    def __init__(self, runtime: Runtime, nursery: trio.Nursery, reply: Reply, level: _LogLevel,
                 upload: Upload) -> None:
        self.runtime, self.nursery, self.reply, self.level = runtime, nursery, reply, level
        self.upload = upload

    async def run(self, request: SupportRequest) -> dict[str, Any]:
        runtime = self.runtime
        if request.kind is SupportKind.HEALTH:
            checks = await runtime.health.latest()
            return {"checks": [c.as_dict() for c in checks]}
        if request.kind is SupportKind.DIAGNOSTICS:
            return await diagnostics(runtime)
        if request.kind is SupportKind.RESYNC:
            if request.args["full"]:
                await runtime.db.write(require_snapshot)
            runtime.resync_requests.notify()
            return {"requested": True, "full": request.args["full"]}
        if request.kind is SupportKind.BUNDLE:
            return await upload_bundle(runtime, request.request_id, request.args["logs"], self.upload)
        await self.nursery.start(partial(self.level.hold, request.args["level"], request.args["duration_s"]))
        return {"level": request.args["level"], "for_s": request.args["duration_s"]}

    async def handle(self, msg: ReceivedMessage) -> Settle:
        try:
            request = parse_request(msg.body)
        except SupportRequestError as exc:
            log.warning("support: message %s is not a request; dead-lettered: %s", msg.message_id or "?", exc)
            return Settle(verdict=Disposition.DEAD_LETTER, reason="not a valid support request", description=str(exc))
        log.info("support: %s request %s", request.kind, request.request_id)
        try:
            result = await self.run(request)
        except ReplyFailed as exc:  # the bundle upload failed: the request comes again
            log.warning("support: cannot upload the bundle for %s: %s; it will come again", request.request_id, exc)
            await trio.sleep(REPLY_RETRY_S)
            return Settle(verdict=Disposition.ABANDON)
        body = {"status": "ok", "kind": str(request.kind), "body": result}
        try:
            await self.reply(request.request_id, body)
        except ReplyFailed as exc:
            log.warning("support: cannot send the reply to %s: %s; it will come again", request.request_id, exc)
            await trio.sleep(REPLY_RETRY_S)
            return Settle(verdict=Disposition.ABANDON)
        return Settle()


def _checks(runtime: Runtime, state: QueueLinkStatus) -> list[Check]:
    window = runtime.support_window
    data = {**state.as_dict(), "window": window.describe()}
    if not window.is_open:
        return [Check(name="support.channel", status=Status.OK, message=Text("remote support channel: off"), data=data)]
    words = window.describe()
    if state.phase is QueuePhase.CONNECTED:
        return [Check(name="support.channel", status=Status.OK,
                      message=Text("remote support channel: {window}, connected to {namespace}", window=words,
                                   namespace=state.namespace), data=data)]
    if state.phase in (QueuePhase.AUTH_FAILED, QueuePhase.CONFIG_ERROR, QueuePhase.RETRYING):
        return [Check(name="support.channel", status=Status.WARN,
                      message=Text("remote support channel ({window}) cannot connect: {error}", window=words,
                                   error=state.last_error),
                      fix=Text("check the pairing and the internet link (HTTPS to the namespace on 443)"), data=data)]
    message = (Text("remote support channel: {window}, {phase}: {detail}", window=words, phase=str(state.phase),
                    detail=state.detail) if state.detail else
               Text("remote support channel: {window}, {phase}", window=words, phase=str(state.phase)))
    return [Check(name="support.channel", status=Status.OK, message=message, data=data)]


# Where the window is kept across restarts (meta table): its end, and whether
# "[support] enabled = true" has already opened its one window.
_UNTIL_KEY: Final = "support.until"
_CONFIG_OPENED_KEY: Final = "support.config_opened"


async def _restore_window(runtime: Runtime, window: SupportWindow) -> None:
    """The window survives restarts and never gets longer because of one: a window opened
    from the homepage keeps its end; ``[support] enabled = true`` opens one window, once,
    not a fresh one at every start (switching it off in the config re-arms it)."""
    cfg = runtime.config.support

    def load(conn: Any) -> tuple[str | None, str | None]:
        return get_meta(conn, _UNTIL_KEY), get_meta(conn, _CONFIG_OPENED_KEY)

    until_raw, config_opened = await runtime.db.read(load)
    try:
        until = float(until_raw) if until_raw else None
    except ValueError:
        until = None
    if cfg.enabled and not config_opened:
        window.open(cfg.duration_s)
        log.warning("remote support channel on for %g s ([support] enabled)", cfg.duration_s)
    elif until is not None and until > time.time():
        window.open_until(until)
        log.warning("remote support channel still on until %s", window.describe().removeprefix("enabled until "))

    await runtime.db.write(partial(set_meta, key=_CONFIG_OPENED_KEY, value="1" if cfg.enabled else ""))
    await _save_window(runtime, window)


async def _save_window(runtime: Runtime, window: SupportWindow) -> None:
    until = "" if window.until_wall is None else repr(window.until_wall)
    await runtime.db.write(partial(set_meta, key=_UNTIL_KEY, value=until))


async def switch_support(runtime: Runtime, on: bool) -> SupportWindow:
    """Open the window for ``[support] duration_s`` or close it; durable before it returns."""
    window = runtime.support_window
    if on:
        window.open(runtime.config.support.duration_s)
    else:
        window.close()
    await _save_window(runtime, window)
    return window


async def run_support(
    runtime: Runtime,
    *,
    open_link: OpenLink = open_queue_link,
    reply: Reply | None = None,
    upload: Upload | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The support channel until cancelled: consume while the window is open."""
    cfg = runtime.config.support
    state = runtime.support_link
    window = runtime.support_window

    async def checks() -> list[Check]:
        return _checks(runtime, state)

    runtime.health.add("support", checks)
    await _restore_window(runtime, window)
    level = _LogLevel()
    async with trio.open_nursery() as nursery:
        handler = SupportHandler(runtime, nursery, reply or _reply_via_wan(runtime), level,
                                 upload or _upload_via_wan(runtime))
        task_status.started()
        while True:
            seen = window.changes.version
            if window.is_open and window.deadline is not None:
                with trio.move_on_at(window.deadline) as scope:
                    async with trio.open_nursery() as inner:
                        inner.start_soon(partial(consume, runtime, state, handle=handler.handle, open_link=open_link,
                                                 settings=lambda: link_options(runtime, cfg, "support")))
                        await window.changes.wait(seen)
                        inner.cancel_scope.cancel()  # switched on again (new deadline) or off
                if scope.cancelled_caught:
                    log.warning("remote support channel turned itself off (its time ended)")
                    window.close()
                    await _save_window(runtime, window)
                continue
            state.phase, state.detail = QueuePhase.OFF, ""
            level.restore()
            await window.changes.wait(seen)

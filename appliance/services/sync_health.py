"""How cloud sync looks from outside: health checks, /api/status data, metrics.

Checks (names are stable):

- ``cloud.pairing``: paired, not paired, or "pair again" (the platform refused the token).
- ``cloud.link``: the last failure of any sync loop, located on its hop (DNS, TCP,
  proxy, TLS, HTTP), with the fix.
- ``cloud.replica``: how old the replica is (lag since the last pull that got through).
- ``cloud.outbox``: events waiting for the platform, the oldest one's age, rejections.
"""

from __future__ import annotations

import time
from typing import Any, Final

import httpx

from appliance.protocol.health import Check, Status
from appliance.protocol.redact import redact_url
from appliance.protocol.text import Text
from appliance.services.pairing import describe
from appliance.services.runtime import Runtime
from appliance.services.timestamps import duration
from appliance.services.wan import WanConfigError, proxy_for
from appliance.storage.catalog import replica_counts, sync_state
from appliance.storage.events import outbox_stats, recent_rejected

__all__ = ["cloud_checks", "cloud_status", "register"]

# A link failing for longer than this is a failure, not a blip.
LINK_FAIL_AFTER_S: Final = 600.0
# Replica older than this: prices and stock on the shop's screens may be wrong.
REPLICA_WARN_S: Final = 900.0
REPLICA_FAIL_S: Final = 3600.0
# An event waiting longer than this means uploads are not getting through.
OUTBOX_WARN_S: Final = 600.0
OUTBOX_FAIL_S: Final = 3600.0
# Rejections this recent are shown.
REJECTED_SHOWN: Final = 5


def proxy_address(runtime: Runtime) -> str | None:
    wan = runtime.config.wan
    try:
        settings = proxy_for(httpx.URL(runtime.config.cloud.api_url).host, proxy=wan.proxy, no_proxy=wan.no_proxy)
    except WanConfigError:
        return redact_url(wan.proxy)
    return settings.address if settings else None


async def cloud_checks(runtime: Runtime) -> list[Check]:
    now = time.time()
    status = runtime.sync_status
    store = runtime.store
    checks: list[Check] = []
    if status.blocked:
        checks.append(Check(name="cloud.link", status=Status.FAIL, message=Text("cloud sync cannot run: {reason}",
                                                                                       reason=status.blocked),
                            fix=Text("correct the setting named above, then restart the appliance")))
    if store is None:
        if status.pairing_problem:
            checks.append(Check(name="cloud.pairing", status=Status.FAIL,
                                message=Text("the saved pairing cannot be used: {problem}",
                                             problem=status.pairing_problem),
                                fix=Text("pair the box again (homepage, or `appliance pair CODE`)")))
        else:
            checks.append(Check(name="cloud.pairing", status=Status.WARN,
                                message=Text("the box is not paired with a store"),
                                fix=Text("enter the pairing code from the back office on this homepage, "
                                         "or run `appliance pair CODE`")))
        return checks
    if store.needs_repair:
        checks.append(Check(name="cloud.pairing", status=Status.FAIL,
                            message=Text("the platform refused the box's token for store {store}; no sync until "
                                         "the box is paired again (the shop's devices keep working)",
                                         store=store.store_id),
                            fix=Text("get a new pairing code from the back office and pair the box again"),
                            data={"store_id": store.store_id}))
    else:
        checks.append(Check(name="cloud.pairing", status=Status.OK, message=Text("paired with store {store}",
                                                                                 store=store.store_id),
                            data={"store_id": store.store_id}))
    error = status.last_error()
    if not status.blocked:
        if error is None:
            checks.append(Check(name="cloud.link", status=Status.OK,
                                message=Text("the platform answers ({url})", url=runtime.config.cloud.api_url)))
        else:
            loops = [s for s in (status.pull, status.push, status.heartbeat) if s.last_error is not None]
            since = min(s.failing_since or now for s in loops)
            level = Status.FAIL if now - since > LINK_FAIL_AFTER_S else Status.WARN
            checks.append(Check(name="cloud.link", status=level,
                                message=Text("{error} (failing for {duration}; the box retries by itself and keeps "
                                             "serving the shop)", error=error.message, duration=duration(now - since)),
                                fix=error.fix, data=error.as_dict()))
    state = await runtime.db.read(sync_state)
    if state.last_pull_at is None:
        rows = status.snapshot_rows
        checks.append(Check(name="cloud.replica", status=Status.WARN,
                            message=Text("no copy of the store's catalog yet (reading the snapshot: {rows} records "
                                         "so far)", rows=rows) if rows is not None else
                            Text("no copy of the store's catalog yet"),
                            fix="" if rows is not None else
                            Text("wait for the first sync; see cloud.link if it fails")))
    else:
        lag = now - state.last_pull_at
        level = Status.OK if lag < REPLICA_WARN_S else Status.WARN if lag < REPLICA_FAIL_S else Status.FAIL
        checks.append(Check(name="cloud.replica", status=level,
                            message=Text("catalog, prices and stock as of {duration} ago (cursor {cursor})",
                                         duration=duration(lag), cursor=state.cursor),
                            fix="" if level is Status.OK else Text("see cloud.link for why the sync does not get "
                                                                   "through"),
                            data={"cursor": state.cursor, "lag_s": round(lag, 1)}))
    stats = await runtime.db.read(outbox_stats)
    age = 0.0 if stats.oldest_unsent_at is None else now - stats.oldest_unsent_at
    level = Status.OK if age < OUTBOX_WARN_S else Status.WARN if age < OUTBOX_FAIL_S else Status.FAIL
    message = (Text("{count} events waiting for the platform, the oldest for {duration}", count=stats.queued,
                    duration=duration(age)) if stats.queued else
               Text("{count} events waiting for the platform", count=stats.queued))
    fix = "" if level is Status.OK else Text("see cloud.link; nothing is lost, they go once the platform answers")
    if stats.rejected:
        message = Text("{message}; {count} rejected by the platform (kept on the box with the reason)",
                       message=message, count=stats.rejected)
        if level is Status.OK:
            level = Status.WARN
            fix = Text("see the Cloud section of the homepage for the reasons; fix the device that sent them")
    checks.append(Check(name="cloud.outbox", status=level, message=message, fix=fix,
                        data={"queued": stats.queued, "rejected": stats.rejected, "oldest_unsent_s": round(age, 1)}))
    return checks


async def cloud_status(runtime: Runtime) -> dict[str, Any]:
    """The ``cloud`` key of /api/status."""
    now = time.time()
    state = await runtime.db.read(sync_state)
    stats = await runtime.db.read(outbox_stats)
    rejected = await runtime.db.read(lambda conn: recent_rejected(conn, REJECTED_SHOWN))
    counts = await runtime.db.read(replica_counts)
    status = runtime.sync_status
    error = status.last_error()
    return {
        "pairing": describe(runtime.store),
        "api_url": runtime.config.cloud.api_url,
        "proxy": proxy_address(runtime),
        "blocked": status.blocked or None,
        "pairing_problem": status.pairing_problem or None,
        "sync": {
            "cursor": state.cursor,
            "last_pull_at": state.last_pull_at,
            "lag_s": None if state.last_pull_at is None else round(max(0.0, now - state.last_pull_at), 1),
            "snapshot_rows": status.snapshot_rows,
            "snapshots": state.snapshots,
            "replica": counts,
        },
        "outbox": {"queued": stats.queued, "in_flight": stats.in_flight, "accepted": stats.accepted,
                   "rejected": stats.rejected,
                   "oldest_unsent_s": None if stats.oldest_unsent_at is None
                   else round(now - stats.oldest_unsent_at, 1),
                   "recent_rejections": rejected},
        "loops": {"pull": status.pull.as_dict(), "push": status.push.as_dict(),
                  "heartbeat": status.heartbeat.as_dict()},
        "last_error": error.as_dict() if error else None,
    }


def register(runtime: Runtime) -> None:
    """Add the cloud checks and metrics to the runtime (once per runtime)."""
    runtime.health.add("cloud", lambda: cloud_checks(runtime))
    runtime.metrics.describe_counter("sync_changes_applied", "replica rows written or deleted from the changes feed")
    runtime.metrics.describe_counter("sync_snapshots", "snapshots loaded")
    runtime.metrics.describe_counter("sync_events_accepted", "events the platform accepted")
    runtime.metrics.describe_counter("sync_events_rejected", "events the platform rejected for good")
    runtime.metrics.describe_counter("sync_failures", "failed calls to the platform, by loop and hop")

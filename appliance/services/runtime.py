"""What every service and web app of one running appliance shares.

Built once by the supervisor before any service starts; services read it and register
their own metrics and health checks on it. Nothing here does I/O by itself.
"""

from __future__ import annotations

import time

import attrs
import trio

from appliance.config import Config
from appliance.health import HealthRegistry
from appliance.protocol.sync import SyncStatus
from appliance.services.board import ServiceBoard
from appliance.services.media_files import MediaShelf
from appliance.services.metrics import Metrics
from appliance.services.signal import ChangeSignal
from appliance.storage import Database
from appliance.storage.pairing import StoreLink

__all__ = ["Runtime"]


@attrs.define(kw_only=True, eq=False)
class Runtime:
    config: Config
    db: Database
    appliance_id: str
    admin_token: str
    board: ServiceBoard = attrs.field(factory=ServiceBoard)
    metrics: Metrics = attrs.field(factory=Metrics)
    health: HealthRegistry = attrs.field(factory=HealthRegistry)
    started_at: float = attrs.field(factory=time.time)
    # The effective port map: the configured one, with each listener's port as bound
    # (differs with --port-offset or port 0). Discovery announces this one.
    ports: dict[str, int] = attrs.field(factory=dict)
    # Set when the box is asked to stop: listeners stop accepting and finish in-flight work.
    stopping: trio.Event = attrs.field(factory=trio.Event)
    # Notified whenever the device registry changes (a device adopted, rejected, removed,
    # or its address changed): the dispatcher starts and stops its per-device tasks on it.
    device_changes: ChangeSignal = attrs.field(factory=ChangeSignal)
    # Notified whenever commands are enqueued to a device's outbox.
    outbox_changes: ChangeSignal = attrs.field(factory=ChangeSignal)
    # The pairing with the store (None: not paired): store id, token, the services the
    # store has (Service Bus, media, logs, support) and the store secret (discovery HMAC).
    # Set by the cloud.pairing service (loaded before the listeners start, then on pairing
    # and on a 401); pairing_changes is notified every time it changes, "needs_repair" too.
    store: StoreLink | None = None
    pairing_changes: ChangeSignal = attrs.field(factory=ChangeSignal)
    # Notified whenever events are queued for the platform (sales, orders, statuses).
    uplink_changes: ChangeSignal = attrs.field(factory=ChangeSignal)
    # What the cloud sync loops last saw (homepage, /api/status, health, heartbeat).
    sync_status: SyncStatus = attrs.field(factory=SyncStatus)
    # Notified when someone asks for a pull from the platform now (the remote support
    # channel's "resync"); the sync service's pull loop wakes on it.
    resync_requests: ChangeSignal = attrs.field(factory=ChangeSignal)
    # The media cache (files, status, serve times): set by the media service when it starts.
    media: MediaShelf | None = None

    def uptime_s(self) -> float:
        return max(0.0, time.time() - self.started_at)

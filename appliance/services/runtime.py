"""What every service and web app of one running appliance shares.

Built once by the supervisor before any service starts; services read it and register
their own metrics and health checks on it. Nothing here does I/O by itself.

Every piece of per-runtime state is a typed field here, with its one writer named beside
it (``tests/test_architecture.py`` checks that no other module writes it); everyone else
reads. A service that restarts resets its own record.
"""

from __future__ import annotations

import time

import attrs
import trio

from appliance.config import Config
from appliance.health import HealthRegistry
from appliance.protocol.firmware import FirmwareStatus
from appliance.protocol.logship import ShippingStatus
from appliance.protocol.sync import SyncStatus
from appliance.services.board import ServiceBoard
from appliance.services.budget import BodyBudget
from appliance.services.event_hub import EventHub
from appliance.services.keyring import KeyRing
from appliance.services.media_files import MediaShelf
from appliance.services.metrics import Metrics
from appliance.services.signal import ChangeSignal, OutboxChanges, Requests
from appliance.services.state import BoundPorts, DeviceLinkBoard, QueueLinkStatus, SupportWindow
from appliance.storage import Database
from appliance.storage.logring import LogRing
from appliance.storage.owner import AdminCredential
from appliance.storage.pairing import StoreLink

__all__ = ["Runtime"]


@attrs.define(kw_only=True, eq=False)
class Runtime:
    config: Config
    db: Database
    appliance_id: str
    # The admin credential in effect and where it came from (storage/owner.py). Written by:
    # services.owner (pairing brings the owner's; the settings page changes it).
    admin: AdminCredential
    # The box's key pair and the device keys (enrollment, signed requests, the 8081 hello).
    # Made by the supervisor; its caches change only through its own methods (forget() on
    # every change of a device's key or state).
    keys: KeyRing
    # Supervised services' states (the supervisor) and details (each service, its own).
    board: ServiceBoard = attrs.field(factory=ServiceBoard)
    metrics: Metrics = attrs.field(factory=Metrics)
    health: HealthRegistry = attrs.field(factory=HealthRegistry)
    started_at: float = attrs.field(factory=time.time)
    # The effective port map (configured, then as bound). Written by: services.http (each
    # listener's role) and services.discovery (its UDP port). Discovery announces it.
    ports: BoundPorts = attrs.field(default=attrs.Factory(lambda self: BoundPorts(self.config.lan.ports),
                                                          takes_self=True))
    # Set once every service started and READY=1 went to systemd. Written by: the supervisor.
    ready: trio.Event = attrs.field(factory=trio.Event)
    # Set when the box is asked to stop: listeners stop accepting and finish in-flight work.
    stopping: trio.Event = attrs.field(factory=trio.Event)
    # Notified whenever the device registry changes (a device adopted, rejected, removed,
    # or its address changed): the dispatcher starts and stops its per-device tasks on it.
    device_changes: ChangeSignal = attrs.field(factory=ChangeSignal)
    # Status tickets asked for by a device's own button (device ids); services/ticket.py prints them.
    ticket_requests: Requests = attrs.field(factory=Requests)
    # Notified (or handed the new commands) whenever commands are enqueued to a device's
    # outbox; the dispatcher takes them while it runs.
    outbox_changes: OutboxChanges = attrs.field(factory=OutboxChanges)
    # The pairing with the store (None: not paired): store id, token, the services the
    # store has (Service Bus, media, logs, support) and the store secret (discovery HMAC).
    # Written by: services.pairing, through set_store() (loaded before the listeners start,
    # then on pairing and on a 401), which notifies pairing_changes, "needs_repair" too.
    _store: StoreLink | None = attrs.field(default=None, alias="store")
    pairing_changes: ChangeSignal = attrs.field(factory=ChangeSignal)
    # Held while pairing: the check "is the box unpaired, so no credential is needed" and
    # the pairing it allows happen as one step (services/pairing.py).
    pairing_lock: trio.Lock = attrs.field(factory=trio.Lock)
    # Notified whenever events are queued for the platform (sales, orders, statuses).
    uplink_changes: ChangeSignal = attrs.field(factory=ChangeSignal)
    # What the cloud sync loops last saw (homepage, /api/status, health, heartbeat).
    # Written by: services.sync.
    sync_status: SyncStatus = attrs.field(factory=SyncStatus)
    # Notified when someone asks for a pull from the platform now (the remote support
    # channel's "resync"); the sync service's pull loop wakes on it.
    resync_requests: ChangeSignal = attrs.field(factory=ChangeSignal)
    # The device channel's links by device id. Written by: services.dispatcher.
    device_links: DeviceLinkBoard = attrs.field(factory=DeviceLinkBoard)
    # The Service Bus consumers. Written by: services.queue_consumer, for services.orders
    # and services.support_channel.
    orders_link: QueueLinkStatus = attrs.field(factory=lambda: QueueLinkStatus(name="orders"))
    support_link: QueueLinkStatus = attrs.field(factory=lambda: QueueLinkStatus(name="support"))
    # When the remote support channel is open. Written by: services.support_channel.
    support_window: SupportWindow = attrs.field(factory=SupportWindow)
    # The media cache (files, status, serve times). Written by: services.media, when it starts.
    media: MediaShelf | None = None
    # The live side of the event log (port 8001): fed by the event-log service, read by
    # the events listener's connections. Written by: services.event_log.
    event_hub: EventHub = attrs.field(
        default=attrs.Factory(lambda self: EventHub(ring_events=self.config.events.ring_events), takes_self=True))
    # Bytes of request bodies the LAN listeners handle at once. Written by: services.guard.
    body_budget: BodyBudget = attrs.field(default=attrs.Factory(
        lambda self: BodyBudget(self.config.http.body_budget_bytes), takes_self=True))
    # The on-disk log ring (docs/support.md): opened by `appliance run` before anything
    # logs and given to the constructor, else written by: services.log_ring.
    log_ring: LogRing | None = None
    # What the log shipper is doing. Written by: services.log_shipping.
    log_shipping: ShippingStatus = attrs.field(factory=ShippingStatus)

    # Firmware updates: the offer, the download, the trial, the last outcome (homepage,
    # heartbeat). Written by: services.firmware; services.sync hands it the platform's
    # offers (``offered``) and notifies firmware_changes.
    firmware: FirmwareStatus = attrs.field(factory=FirmwareStatus)
    firmware_changes: ChangeSignal = attrs.field(factory=ChangeSignal)

    @property
    def store(self) -> StoreLink | None:
        return self._store

    def set_store(self, link: StoreLink | None) -> None:
        """The pairing changed (paired, re-paired, needs repair, forgotten): tell everyone."""
        self._store = link
        self.pairing_changes.notify()

    @property
    def admin_token(self) -> str:
        return self.admin.token

    def uptime_s(self) -> float:
        return max(0.0, time.time() - self.started_at)

"""The one table of what a running appliance is made of, in start order.

Storage is opened before any of these (see ``appliance.supervisor.open_runtime``); then,
in the start order of docs/architecture.md ("Start order"): the device dispatcher, the
HTTP listeners, discovery, the cloud tasks. Each feature adds its service(s) and its web
parts here and nowhere else.

A listener is one entry of the port map (``appliance.config.PORT_ROLES`` and ``Ports``),
one module under ``appliance.services.web`` and one line of :data:`LISTENER_APPS`;
``tests/test_architecture.py`` checks that these agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Final

from starlette.applications import Starlette

from appliance.config import LISTENER_ROLES
from appliance.health.firewall import firewall_check
from appliance.health.listeners import listener_checks
from appliance.health.system import system_checks
from appliance.health.wan import WanChecks
from appliance.services.checkpoints import run_checkpoints
from appliance.services.discovery import run_device_registry, run_discovery
from appliance.services.dispatcher import run_dispatcher
from appliance.services.event_log import run_event_log
from appliance.services.firmware import run_firmware
from appliance.services.firmware_intake import run_inbox
from appliance.services.http import run_listener
from appliance.services.log_ring import run_log_ring
from appliance.services.log_shipping import run_log_shipping
from appliance.services.media import run_media
from appliance.services.orders import run_orders
from appliance.services.pairing import run_pairing
from appliance.services.runtime import Runtime
from appliance.services.setup import setup_checks
from appliance.services.spec import ServiceSpec
from appliance.services.support_channel import run_support
from appliance.services.sync import run_sync
from appliance.services.ticket import run_first_boot_ticket
from appliance.services.web import admin, api, events, media, ops, provisioning, support
from appliance.services.web import commands as device_commands
from appliance.services.web import live as live_events
from appliance.services.web import orders as online_orders
from appliance.services.web.cors import CorsMiddleware
from appliance.services.web.devices import admin_parts as device_admin_parts
from appliance.services.web.enrollment import provisioning_parts as enrollment_parts
from appliance.services.web.firmware import admin_parts as firmware_admin_parts
from appliance.services.web.media_admin import admin_parts as media_admin_parts
from appliance.services.web.pairing import admin_parts as cloud_admin_parts
from appliance.services.web.parts import WebParts
from appliance.services.web.settings import admin_parts as settings_admin_parts
from appliance.services.web.store import api_parts as store_api_parts
from appliance.services.web.support import admin_parts as support_admin_parts
from appliance.services.web.ticket import admin_parts as ticket_admin_parts

__all__ = ["CORS_ROLES", "LISTENER_APPS", "AppFactory", "listener_apps", "service_specs"]

AppFactory = Callable[[Runtime, WebParts], Starlette]

# The app of each listener role of the port map, beside its role.
LISTENER_APPS: Final[Mapping[str, AppFactory]] = {
    "admin": admin.create_app,
    "api": api.create_app,
    "events": events.create_app,
    "media": media.create_app,
    "provisioning": provisioning.create_app,
    "ops": ops.create_app,
    "support": support.create_app,
}
# The listeners a point-of-sale web app may call from a browser (store API, events, media).
CORS_ROLES = ("api", "events", "media")


def web_parts() -> dict[str, WebParts]:
    """What each feature adds to each listener, keyed by listener role."""
    parts = {role: WebParts() for role in LISTENER_ROLES}
    parts["admin"] += device_admin_parts()  # the device registry: list, adopt, reject
    parts["admin"] += cloud_admin_parts()  # pairing form, cloud sync status
    parts["admin"] += settings_admin_parts()  # the shop's settings: address, proxy, language, admin token
    parts["api"] += online_orders.api_parts()  # online orders: GET /v1/orders (the list)
    parts["admin"] += online_orders.admin_parts()  # online orders, the remote support switch
    parts["api"] += store_api_parts()  # catalog, prices, stock; sales and orders in
    parts["api"] += device_commands.api_parts()  # device commands: enqueue and inspect
    parts["admin"] += device_commands.admin_parts()  # device links and the test-command button
    parts["admin"] += media_admin_parts()  # the media cache: counts, what is missing, last error
    parts["admin"] += live_events.admin_parts()  # the latest events, followed live with JavaScript
    parts["provisioning"] += enrollment_parts()  # device enrollment: keys, the comparison code
    parts["admin"] += support_admin_parts()  # links to the bundle and the live log tail on 8005
    parts["admin"] += ticket_admin_parts()  # the status ticket's button
    parts["admin"] += firmware_admin_parts()  # the firmware running, an update under way, the last outcome, the upload
    return parts


def listener_apps(runtime: Runtime) -> dict[str, Starlette]:
    parts = web_parts()
    apps = {role: LISTENER_APPS[role](runtime, parts[role]) for role in LISTENER_ROLES}
    cors = runtime.config.cors
    for role in CORS_ROLES:  # browser apps from [cors] allowed_origins reach these three
        apps[role].add_middleware(CorsMiddleware, origins=cors.allowed_origins, max_age_s=cors.max_age_s)
    return apps


def register_checks(runtime: Runtime) -> None:
    """The health checks that belong to no single service."""
    runtime.health.add("system", partial(system_checks, Path(runtime.config.storage.dir)))
    runtime.health.add("setup", partial(setup_checks, Path(runtime.config.storage.dir)))  # the boot partition's file
    if (check := firewall_check(runtime.config)) is not None:
        runtime.health.add("firewall", check)
    runtime.health.add("wan", WanChecks(runtime.config, store=lambda: runtime.store))
    runtime.health.add("lan.listeners", lambda: listener_checks(
        runtime.config.lan.bind, {role: runtime.ports.of(role) for role in LISTENER_ROLES}))


def service_specs(runtime: Runtime) -> list[ServiceSpec]:
    register_checks(runtime)
    specs: list[ServiceSpec] = []
    # The log ring first, so every other service's records reach it (docs/support.md).
    specs.append(ServiceSpec(name="logs.ring", run=run_log_ring, core=False))
    # The WAL's checkpoints beside the writer, before anything writes much: no commit then pays
    # for one (appliance/storage/db.py); not core: SQLite's own checkpoint is on without it.
    specs.append(ServiceSpec(name="storage.checkpoints", run=run_checkpoints, core=False))
    # The device dispatcher first (docs/architecture.md, "Start order"): commands flow to devices before anything
    # can enqueue more; graceful: on stop it waits for the acks of what is in flight.
    specs.append(ServiceSpec(name="dispatcher", run=run_dispatcher, core=True, graceful=True))
    # The saved pairing is loaded into runtime.store before anything announces the box.
    specs.append(ServiceSpec(name="cloud.pairing", run=run_pairing, core=False))
    # The event log's reader before the listeners: the events listener serves from it.
    specs.append(ServiceSpec(name="events.log", run=run_event_log, core=False))
    for role, app in listener_apps(runtime).items():
        # A subscriber that stops reading is cut by the kernel (docs/events.md).
        user_timeout = runtime.config.events.send_timeout_s if role == "events" else None
        specs.append(ServiceSpec(name=f"http.{role}", run=partial(run_listener, app=app, role=role,
                                                                  user_timeout_s=user_timeout,
                                                                  quiet_clients=role == "events"),
                                 core=True, graceful=True))
    # The device registry ([[devices]] at start, pruning), then discovery on UDP 57854.
    specs.append(ServiceSpec(name="devices", run=run_device_registry, core=False))
    specs.append(ServiceSpec(name="discovery", run=run_discovery, core=False,
                             enabled=runtime.config.discovery.enabled))
    # Cloud sync: pull the replica, push events, heartbeat (after the LAN is up: the shop
    # is served whatever the WAN does).
    specs.append(ServiceSpec(name="cloud.sync", run=run_sync, core=False))
    # Online orders from Service Bus, and the remote support channel (off until switched
    # on; it runs to serve the homepage switch). Not core: the shop sells without them.
    specs.append(ServiceSpec(name="orders", run=run_orders, core=False, enabled=runtime.config.orders.enabled))
    specs.append(ServiceSpec(name="support.channel", run=run_support, core=False))
    # The media cache's fetcher (serving on 8002 works from what is cached whatever it does).
    specs.append(ServiceSpec(name="media", run=run_media, core=False, enabled=runtime.config.media.enabled))
    # Logs to the log intake: optional, after everything that serves the shop.
    specs.append(ServiceSpec(name="logs.shipping", run=run_log_shipping, core=False))
    # Firmware updates: the trial of a new slot, the platform's offers (docs/updates.md). Last:
    # the trial judges the box once everything else is up.
    specs.append(ServiceSpec(name="update", run=run_firmware, core=False, enabled=runtime.config.update.enabled))
    # A bundle the system found on a USB stick or the boot partition (no shell needed).
    specs.append(ServiceSpec(name="update.inbox", run=run_inbox, core=False, enabled=runtime.config.update.enabled))
    # The status ticket on the first start, once a receipt printer is adopted.
    specs.append(ServiceSpec(name="ticket", run=run_first_boot_ticket, core=False))
    return specs

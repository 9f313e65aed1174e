"""The appliance's configuration: a frozen attrs tree loaded from TOML by cattrs.

Every value has an embedded default, so ``appliance run`` works with no file at all.
Unknown keys are rejected and scalar types are strict (``"false"`` is not a bool,
``"8000"`` is not an int); every error names its path, e.g. ``lan.ports.api: expected
int, got str``.

The port map (``[lan.ports]``) is defined here once. The listeners, the discovery
announcement, the firewall ruleset, the health checks and ``appliance ports`` all derive
from :data:`PORT_ROLES` and :class:`Ports`.

Errors: :class:`ConfigError` (with ``.errors``, one path-named line per problem).
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
import tomllib
import zoneinfo
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from appliance.protocol.errors import FieldError, flatten
from appliance.protocol.firmware import BUNDLE_MAX_BYTES, FirmwareError, MaintenanceWindow
from appliance.protocol.redact import redact_url
from appliance.protocol.text import Text

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DIRECTION_WORDS",
    "LISTENER_ROLES",
    "PORT_ROLES",
    "SETTINGS_FILE",
    "AdminConfig",
    "BusTestSeams",
    "CloudConfig",
    "Config",
    "ConfigError",
    "CorsConfig",
    "DeviceDecl",
    "DiscoveryConfig",
    "DispatchConfig",
    "EventsConfig",
    "HttpConfig",
    "LanConfig",
    "LogConfig",
    "LogsConfig",
    "MediaConfig",
    "MediaTestSeams",
    "NetworkConfig",
    "OrdersConfig",
    "PortRole",
    "Ports",
    "ServiceBusConfig",
    "StorageConfig",
    "SupervisorConfig",
    "SupportConfig",
    "WanConfig",
    "find_config_path",
    "load_config",
    "merge_tables",
    "parse_config",
    "read_toml",
    "structure_strict",
    "to_toml_dict",
]

DEFAULT_CONFIG_PATH: Final = Path("/etc/appliance/appliance.toml")
# In the state directory: the shop's settings from the setup file and the homepage,
# merged over the configuration file (docs/setup.md).
SETTINGS_FILE: Final = "settings.toml"
ENV_CONFIG: Final = "APPLIANCE_CONFIG"

T = TypeVar("T")


class ConfigError(Exception):
    """The configuration is invalid; ``errors`` holds one path-named line per problem."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(self.errors))


# --- validators ---------------------------------------------------------------


def _port(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    # 0 means "any free port": tests and side-by-side runs use it; the effective port
    # map is read back from the bound sockets.
    if not 0 <= value <= 65535:
        raise FieldError(attr.name, f"port must be between 0 and 65535, got {value}")


def _positive(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise FieldError(attr.name, f"must be greater than 0, got {value}")


def _non_negative(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise FieldError(attr.name, f"must be 0 or more, got {value}")


def _https_url(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    if not value.startswith("https://"):
        raise FieldError(attr.name, f"must be an https:// URL (TLS cannot be switched off), got {value!r}")


def _proxy_url(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    if value and not value.startswith(("http://", "https://")):
        raise FieldError(attr.name, f"must be an http:// or https:// proxy URL, got {redact_url(value)!r}")


def _networks(_inst: object, attr: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]) -> None:
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError as exc:
            raise FieldError(attr.name, f"not an IP network: {item!r}") from exc


def _addresses(_inst: object, attr: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]) -> None:
    for item in value:
        try:
            ipaddress.ip_address(item)
        except ValueError as exc:
            raise FieldError(attr.name, f"not an IP address: {item!r}") from exc


def _address(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    if value:
        try:
            ipaddress.ip_address(value)
        except ValueError as exc:
            raise FieldError(attr.name, f"not an IP address: {value!r}") from exc


def _one_of(*choices: str) -> Any:
    def check(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
        if value not in choices:
            raise FieldError(attr.name, f"must be one of {', '.join(choices)}; got {value!r}")

    return check


# --- the port map -------------------------------------------------------------


class Transport(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"


class Direction(enum.StrEnum):
    IN = "in"
    OUT = "out"
    BOTH = "in+out"


# A direction in words, in the reader's language (the homepage's and `appliance ports`' tables).
DIRECTION_WORDS: Final = {Direction.IN: Text("in"), Direction.OUT: Text("out"), Direction.BOTH: Text("in and out")}


@attrs.frozen(kw_only=True)
class PortRole:
    """What one entry of the port map is for."""

    role: str
    transport: Transport
    direction: Direction
    listener: bool  # an HTTP listener the supervisor binds
    description: str  # a Text: the homepage says it in the reader's language


PORT_ROLES: Final[tuple[PortRole, ...]] = (
    PortRole(role="admin", transport=Transport.TCP, direction=Direction.IN, listener=True,
             description=Text("admin: status homepage, pairing, device adoption, health, logs")),
    PortRole(role="api", transport=Transport.TCP, direction=Direction.IN, listener=True,
             description=Text("store API: catalog, prices, stock, sales and orders in")),
    PortRole(role="events", transport=Transport.TCP, direction=Direction.IN, listener=True,
             description=Text("events: live push to devices and browsers (WebSocket)")),
    PortRole(role="media", transport=Transport.TCP, direction=Direction.IN, listener=True,
             description=Text("media: cached images, videos, documents")),
    PortRole(role="provisioning", transport=Transport.TCP, direction=Direction.IN, listener=True,
             description=Text("provisioning: device enrollment and per-device configuration")),
    PortRole(role="ops", transport=Transport.TCP, direction=Direction.IN, listener=True,
             description=Text("ops: /healthz, /readyz, /metrics, health report")),
    PortRole(role="support", transport=Transport.TCP, direction=Direction.IN, listener=True,
             description=Text("support: diagnostics bundle and live log tail")),
    PortRole(role="discovery", transport=Transport.UDP, direction=Direction.BOTH, listener=False,
             description=Text("discovery: probes, replies and beacons")),
    PortRole(role="device", transport=Transport.TCP, direction=Direction.OUT, listener=False,
             description=Text("device channel: the box pushes commands to each device")),
)
LISTENER_ROLES: Final = tuple(r.role for r in PORT_ROLES if r.listener)


@attrs.frozen(kw_only=True)
class Ports:
    """The one port map. Field names are the roles of :data:`PORT_ROLES`."""

    admin: int = attrs.field(default=80, validator=_port)
    api: int = attrs.field(default=8000, validator=_port)
    events: int = attrs.field(default=8001, validator=_port)
    media: int = attrs.field(default=8002, validator=_port)
    provisioning: int = attrs.field(default=8003, validator=_port)
    ops: int = attrs.field(default=8004, validator=_port)
    support: int = attrs.field(default=8005, validator=_port)
    discovery: int = attrs.field(default=57854, validator=_port)
    device: int = attrs.field(default=8081, validator=_port)

    def __attrs_post_init__(self) -> None:
        seen: dict[int, str] = {}
        for role in LISTENER_ROLES:
            port = getattr(self, role)
            if port and port in seen:
                raise ValueError(f"port {port} is given to both {seen[port]} and {role}")
            seen[port] = role

    def as_dict(self) -> dict[str, int]:
        return {r.role: getattr(self, r.role) for r in PORT_ROLES}

    def with_offset(self, offset: int) -> Ports:
        """The map with ``offset`` added to every TCP listener port (0 stays 0)."""
        if offset == 0:
            return self
        changes = {r: getattr(self, r) + offset for r in LISTENER_ROLES if getattr(self, r)}
        bad = [f"{r}={p}" for r, p in changes.items() if p > 65535]
        if bad:
            raise ConfigError([f"--port-offset {offset} pushes ports past 65535: {', '.join(bad)}"])
        return attrs.evolve(self, **changes)


# --- sections -----------------------------------------------------------------

PRIVATE_AND_LINK_LOCAL: Final = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "fc00::/7",
    "fe80::/10",
)


@attrs.frozen(kw_only=True)
class LanConfig:
    bind: str = "0.0.0.0"
    ports: Ports = attrs.field(factory=Ports)
    # Who counts as "the LAN" for the firewall: private and link-local ranges by default.
    prefixes: tuple[str, ...] = attrs.field(default=PRIVATE_AND_LINK_LOCAL, validator=_networks)


@attrs.frozen(kw_only=True)
class StorageConfig:
    dir: str = "/var/lib/appliance"


# A token anyone on the LAN could guess in a day is no token (generated ones have 43).
ADMIN_TOKEN_MIN: Final = 24


def _admin_token(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    if value and len(value) < ADMIN_TOKEN_MIN:
        raise FieldError(attr.name, f"must be at least {ADMIN_TOKEN_MIN} characters (it has {len(value)}); "
                                    "leave it empty and the box makes one")


@attrs.frozen(kw_only=True)
class AdminConfig:
    # Bearer token for admin endpoints; empty = the owner's (from pairing or the settings
    # page) or else generated at first start, stored 0600. Set here, it is pinned.
    token: str = attrs.field(default="", validator=_admin_token)
    # The language of the homepage, the status ticket and the CLI.
    language: str = attrs.field(default="en", validator=_one_of("en", "fr"))
    # Print the status ticket on the box's first start, once a receipt printer is adopted.
    first_start_ticket: bool = True


@attrs.frozen(kw_only=True)
class HttpConfig:
    """Bounds of every LAN listener (docs/hardening.md)."""

    # Bodies above this are refused with 413 before they are buffered.
    max_body_bytes: int = attrs.field(default=1_048_576, validator=_positive)
    # Idle time allowed between requests, and for a new connection's request head.
    keep_alive_timeout_s: float = attrs.field(default=5.0, validator=_positive)
    # No byte from the client for this long closes the connection.
    read_timeout_s: float = attrs.field(default=30.0, validator=_positive)
    # A request body must have arrived whole within this long of the app asking for it.
    body_timeout_s: float = attrs.field(default=15.0, validator=_positive)
    # Open connections per listener (lowered at start if the descriptor limit is short),
    # and from one address; over a cap a connection is reset at once.
    max_connections: int = attrs.field(default=512, validator=_positive)
    max_connections_per_source: int = attrs.field(default=32, validator=_positive)
    # Requests one listener handles at once (the rest wait their turn; /healthz is exempt).
    max_requests_in_progress: int = attrs.field(default=16, validator=_positive)
    # Bytes of request bodies being handled at once, process-wide (a parsed JSON body takes
    # up to about 20 times its size); a request that finds no room within body_timeout_s gets 503.
    body_budget_bytes: int = attrs.field(default=2 * 1_048_576, validator=_positive)
    # Host names served besides IP literals, localhost and this machine's own names
    # (DNS rebinding); "*" serves any.
    allowed_hosts: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class SupervisorConfig:
    # SIGTERM: in-flight requests and device sends get this long, then everything is cancelled.
    shutdown_deadline_s: float = attrs.field(default=10.0, validator=_positive)
    restart_initial_s: float = attrs.field(default=1.0, validator=_positive)
    restart_max_s: float = attrs.field(default=60.0, validator=_positive)
    # More than max_crashes crashes within crash_window_s marks a service failed.
    max_crashes: int = attrs.field(default=5, validator=_positive)
    crash_window_s: float = attrs.field(default=300.0, validator=_positive)


@attrs.frozen(kw_only=True)
class LogConfig:
    level: str = attrs.field(default="info", validator=_one_of("debug", "info", "warning", "error"))
    format: str = attrs.field(default="text", validator=_one_of("text", "json"))


def _optional_https_url(inst: object, attr: attrs.Attribute[str], value: str) -> None:
    if value:
        _https_url(inst, attr, value)


def _share(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
    if not 0 < value <= 1:
        raise FieldError(attr.name, f"must be a share of the uplink in (0, 1], got {value}")


@attrs.frozen(kw_only=True)
class LogsTestSeams:
    """``[logs.testing]``: seams for tests and measurements only, off by default; a box
    never sets them."""

    # Log this many synthetic records per second (0 = off), starting flood_after_s after
    # the start, stopping after flood_records of them (0 = never).
    flood_per_s: float = attrs.field(default=0.0, validator=_non_negative)
    flood_after_s: float = attrs.field(default=0.0, validator=_non_negative)
    flood_records: int = attrs.field(default=0, validator=_non_negative)


@attrs.frozen(kw_only=True)
class LogsConfig:
    """``[logs]``: the on-disk log ring and shipping to the log intake (docs/support.md)."""

    # The ring in <storage.dir>/logs: its cap, and how often buffered records are written
    # (no fsync per record: a crash loses at most this long; the SD card's wear matters).
    ring_bytes: int = attrs.field(default=64 * 1024 * 1024, validator=attrs.validators.ge(64 * 1024))
    flush_interval_s: float = attrs.field(default=1.0, validator=_positive)
    # Shipping: the intake's URL and key from here, else from pairing's `logs`; off when
    # neither gives one, or with ship = false.
    ship: bool = True
    url: str = attrs.field(default="", validator=_optional_https_url)
    api_key: str = ""
    ca_file: str = ""
    interval_s: float = attrs.field(default=10.0, validator=_positive)
    batch_records: int = attrs.field(default=1000, validator=_positive)
    batch_bytes: int = attrs.field(default=512 * 1024, validator=_positive)
    # The uplink the shop has (bytes/s) and the share of it logs may use, averaged.
    uplink_bytes_per_s: int = attrs.field(default=125_000, validator=_positive)
    uplink_share: float = attrs.field(default=0.05, validator=_share)
    backoff_initial_s: float = attrs.field(default=2.0, validator=_positive)
    backoff_max_s: float = attrs.field(default=300.0, validator=_positive)
    connect_timeout_s: float = attrs.field(default=10.0, validator=_positive)
    read_timeout_s: float = attrs.field(default=30.0, validator=_positive)
    testing: LogsTestSeams = attrs.field(factory=LogsTestSeams)


@attrs.frozen(kw_only=True)
class DiscoveryConfig:
    enabled: bool = True
    interval_s: float = attrs.field(default=10.0, validator=_positive)
    # Broadcast targets; empty = the broadcast address of each up IPv4 interface.
    broadcast: tuple[str, ...] = attrs.field(default=(), validator=_addresses)
    name: str = ""  # announced name; empty = the hostname


def _device_key(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    if value and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value)):
        raise ValueError(f"{attr.name}: must be 64 lowercase hex characters (run `appliance device-key` to make one)"
                         f", got {len(value)} characters")


@attrs.frozen(kw_only=True)
class DeviceDecl:
    """A device declared in config: adopted from the start (for stores without discovery)."""

    id: str
    kind: str
    address: str = attrs.field(validator=lambda i, a, v: _addresses(i, a, (v,)))
    port: int = attrs.field(default=8081, validator=_port)
    name: str = ""
    # The device's pre-shared key: 64 hex characters (``appliance device-key`` makes one
    # and prints it once). Empty: the device is listed but gets no commands until it has one.
    key: str = attrs.field(default="", validator=_device_key, repr=False)


@attrs.frozen(kw_only=True)
class DispatchConfig:
    window: int = attrs.field(default=32, validator=_positive)
    acked_retention_s: float = attrs.field(default=7 * 86400.0, validator=_non_negative)
    connect_timeout_s: float = attrs.field(default=5.0, validator=_positive)
    backoff_initial_s: float = attrs.field(default=0.5, validator=_positive)
    backoff_max_s: float = attrs.field(default=30.0, validator=_positive)
    ping_interval_s: float = attrs.field(default=15.0, validator=_positive)
    # A WebSocket ping not answered within this long drops the connection (dead Wi-Fi).
    ping_timeout_s: float = attrs.field(default=10.0, validator=_positive)
    # After connecting, the device must say hello within this long.
    hello_timeout_s: float = attrs.field(default=10.0, validator=_positive)
    # Commands in flight and no ack or nack for this long (since the oldest was sent or the
    # last answer came) drops the connection; everything unacknowledged is sent again.
    ack_timeout_s: float = attrs.field(default=30.0, validator=_positive)
    # A nack with retry: true holds the device's commands this long, doubling up to the max.
    retry_initial_s: float = attrs.field(default=1.0, validator=_positive)
    retry_max_s: float = attrs.field(default=30.0, validator=_positive)
    # How often expired commands are swept and settled ones pruned.
    maintenance_interval_s: float = attrs.field(default=60.0, validator=_positive)
    # Health: an unacknowledged command older than this warns, older than fail_age_s fails.
    warn_age_s: float = attrs.field(default=300.0, validator=_positive)
    fail_age_s: float = attrs.field(default=3600.0, validator=_positive)


@attrs.frozen(kw_only=True)
class WanConfig:
    # HTTP proxy for every WAN path (sync API, Service Bus, blob, logs); empty = direct.
    proxy: str = attrs.field(default="", validator=_proxy_url)
    no_proxy: tuple[str, ...] = ()
    # For the firewall: empty = allow DNS/NTP to any address.
    dns_servers: tuple[str, ...] = attrs.field(default=(), validator=_addresses)
    ntp_servers: tuple[str, ...] = attrs.field(default=(), validator=_addresses)


@attrs.frozen(kw_only=True)
class CloudConfig:
    api_url: str = attrs.field(default="https://api.server.commerce-hub.io", validator=_https_url)
    # Extra CA bundle (PEM) for TLS-inspecting proxies or test CAs. Verification stays on.
    ca_file: str = ""
    connect_timeout_s: float = attrs.field(default=10.0, validator=_positive)
    read_timeout_s: float = attrs.field(default=30.0, validator=_positive)
    pull_interval_s: float = attrs.field(default=30.0, validator=_positive)
    push_interval_s: float = attrs.field(default=5.0, validator=_positive)
    heartbeat_interval_s: float = attrs.field(default=60.0, validator=_positive)
    page_limit: int = attrs.field(default=500, validator=_positive)
    backoff_max_s: float = attrs.field(default=300.0, validator=_positive)
    # First retry delay after a failed call (doubling up to backoff_max_s, with jitter).
    backoff_initial_s: float = attrs.field(default=1.0, validator=_positive)
    # Events per upload (the platform takes at most 500).
    push_batch: int = attrs.field(default=100, validator=_positive)
    # Accepted events stay in the outbox this long (for diagnosis), then are dropped.
    accepted_retention_s: float = attrs.field(default=86400.0, validator=_non_negative)


@attrs.frozen(kw_only=True)
class MediaTestSeams:
    """``[media.testing]``: seams for tests only, off by default; a box never sets them."""

    # Pause this long around a file's rename (half between its verification and the
    # rename, half between the rename and its database row), so a test can kill the
    # process inside those windows (0 = off).
    pause_at_rename_s: float = attrs.field(default=0.0, validator=_non_negative)


@attrs.frozen(kw_only=True)
class MediaConfig:
    """``[media]``: the cache of the store's images, videos and documents (docs/media.md)."""

    enabled: bool = True
    # The cache's size limit, and the free disk the box always keeps whatever the limit.
    max_bytes: int = attrs.field(default=2 * 1024**3, validator=_positive)
    min_free_bytes: int = attrs.field(default=512 * 1024**2, validator=_non_negative)
    # Download rate over all downloads (bytes/s): about 2 Mbit/s, a modest share of a shop
    # uplink that also carries card payments. 0 = no limit.
    max_rate: int = attrs.field(default=250_000, validator=_non_negative)
    # Downloads at a time.
    concurrency: int = attrs.field(default=2, validator=_positive)
    # Who may read (docs/media.md): "lan" = anyone on the LAN, except entries the platform
    # marks private; "device" = every read needs the admin token or a device credential.
    access: str = attrs.field(default="lan", validator=_one_of("lan", "device"))
    # A file not cached yet: false = 503 with Retry-After; true = streamed to the reader while
    # it is downloaded and cached (the last chunk only once verified; docs/media.md).
    pass_through: bool = False
    # Cache-Control max-age for served files (seconds); the ETag revalidates after it.
    max_age_s: int = attrs.field(default=3600, validator=_non_negative)
    # A failed download is tried again after this, doubling up to the max (with jitter).
    backoff_initial_s: float = attrs.field(default=2.0, validator=_positive)
    backoff_max_s: float = attrs.field(default=300.0, validator=_positive)
    # How often the replica's media manifest is compared with the cache.
    scan_interval_s: float = attrs.field(default=5.0, validator=_positive)
    # Seams for tests, fenced off in their own table.
    testing: MediaTestSeams = attrs.field(factory=MediaTestSeams)


def _routing(_inst: object, attr: attrs.Attribute[Any], value: Mapping[str, tuple[str, ...]]) -> None:
    # A TOML string where a list is meant arrives split into letters: refuse those too.
    for kind, commands in value.items():
        bad = [c for c in commands if not re.fullmatch(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*", c)]
        if not kind or bad:
            raise FieldError(attr.name, f"{kind!r}: expected a list of command kinds such as "
                                         f'["order.created"], got {list(commands)!r}')


@attrs.frozen(kw_only=True)
class BusTestSeams:
    """``[orders.testing]`` / ``[support.testing]``: seams for tests and the demo only, off
    by default. A box in a shop never sets them."""

    # Where the TLS connection really goes ("host:port": a local AMQP peer); the AMQP
    # host and the token audience stay the namespace's. Empty: the namespace on 443.
    endpoint: str = ""
    # Pause this long between an order's commit and the message's completion, so a test
    # can kill the process inside that window (0 = off).
    pause_after_commit_s: float = attrs.field(default=0.0, validator=_non_negative)


@attrs.frozen(kw_only=True)
class ServiceBusConfig:
    """One Service Bus namespace reached by AMQP over WebSockets on 443."""

    enabled: bool = False
    namespace: str = "e-serversync-ns.servicebus.windows.net"
    queue: str = ""  # empty = from pairing
    sas_key_name: str = ""
    sas_key: str = ""
    ca_file: str = ""
    max_wait_s: float = attrs.field(default=5.0, validator=_positive)
    # Support channel only: it turns itself off after this long.
    duration_s: float = attrs.field(default=4 * 3600.0, validator=_positive)
    # Orders only: device kind -> command kinds it receives, used when the store's
    # configuration (store_config.routing, synced) has none. Empty = the built-in default
    # (docs/orders.md): order.created and order.updated to kitchen screens, order.created
    # to printers.
    routing: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict, validator=_routing)
    # Seams for tests and the demo, fenced off in their own table.
    testing: BusTestSeams = attrs.field(factory=BusTestSeams)


@attrs.frozen(kw_only=True)
class OrdersConfig(ServiceBusConfig):
    """``[orders]``: on by default; it only connects once pairing (or config) gives it a
    queue and a key. Its own class so a file that writes ``[orders]`` keeps these defaults."""

    enabled: bool = True


@attrs.frozen(kw_only=True)
class SupportConfig(ServiceBusConfig):
    """``[support]``: the remote support namespace, off by default."""

    namespace: str = "koostodesapp-ns.servicebus.windows.net"


def _origins(_inst: object, attr: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]) -> None:
    for item in value:
        if not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?", item):
            raise FieldError(attr.name, f"expected an origin such as \"https://pos.example.com\" (scheme, host, "
                                        f"optional port; no path, no trailing slash), got {item!r}")


@attrs.frozen(kw_only=True)
class CorsConfig:
    """``[cors]``: web apps (served from these origins) that may call the box from a browser
    on the store API, events and media ports; docs/events.md says what a browser can do."""

    allowed_origins: tuple[str, ...] = attrs.field(default=(), validator=_origins)
    # How long a browser may cache a preflight's answer.
    max_age_s: int = attrs.field(default=600, validator=_non_negative)


@attrs.frozen(kw_only=True)
class EventsConfig:
    """``[events]``: the event log and the live stream on port 8001 (docs/events.md)."""

    # The log keeps at most this many events, none older than retention_s; a client whose
    # last id is older gets "resync".
    retention_rows: int = attrs.field(default=100_000, validator=_positive)
    retention_s: float = attrs.field(default=7 * 86400.0, validator=_positive)
    prune_interval_s: float = attrs.field(default=300.0, validator=_positive)
    # The newest events held in memory for live subscribers (about 300 bytes each). A
    # subscriber further behind than this, or behind by more than max_lag_s, is told to
    # resume from its last id and disconnected.
    ring_events: int = attrs.field(default=16_384, validator=_positive)
    max_lag_s: float = attrs.field(default=30.0, validator=_positive)
    # A send that makes no progress for this long (a stalled reader, dead Wi-Fi) ends the
    # connection (TCP_USER_TIMEOUT on the listener's sockets).
    send_timeout_s: float = attrs.field(default=20.0, validator=_positive)
    # The box sends a ping this often; a WebSocket client that sends nothing (a pong, or
    # any message) for idle_timeout_s is disconnected.
    ping_interval_s: float = attrs.field(default=15.0, validator=_positive)
    idle_timeout_s: float = attrs.field(default=45.0, validator=_positive)
    # Subscribers at once (WebSocket and SSE together); more are refused with 503.
    max_subscribers: int = attrs.field(default=256, validator=_positive)


def _interface(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    if not value:
        return
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError as exc:
        raise FieldError(attr.name, f"not an address with its prefix length, such as 192.168.1.50/24: "
                                    f"{value!r}") from exc
    if "/" not in value:
        raise FieldError(attr.name, f"give the prefix length too, such as {value}/24")
    net = iface.network
    if iface.version == 4 and net.prefixlen < 31 and iface.ip in (net.network_address, net.broadcast_address):
        raise FieldError(attr.name, f"{iface.ip} is the network's own or broadcast address, not a host's")


@attrs.frozen(kw_only=True)
class NetworkConfig:
    """The box's own address on the shop's LAN (every wired interface). Empty: DHCP."""

    address: str = attrs.field(default="", validator=_interface)  # "192.168.1.50/24"
    gateway: str = attrs.field(default="", validator=_address)

    def __attrs_post_init__(self) -> None:
        if bool(self.address) != bool(self.gateway):
            raise FieldError("gateway" if self.address else "address",
                             "a static address needs both address and gateway (or neither, for DHCP)")
        if self.address and ipaddress.ip_address(self.gateway) not in ipaddress.ip_interface(self.address).network:
            raise FieldError("gateway", f"{self.gateway} is not in the box's network "
                                        f"{ipaddress.ip_interface(self.address).network}")


def _window(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    try:
        MaintenanceWindow.parse(value)
    except FirmwareError as exc:
        raise FieldError(attr.name, str(exc)) from exc


def _bundle_size(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if not 0 < value <= BUNDLE_MAX_BYTES:
        raise FieldError(attr.name, f"must be from 1 to {BUNDLE_MAX_BYTES} bytes, got {value}")


def _timezone(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    if not value:
        return
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise FieldError(attr.name, f"not a time zone such as Europe/Paris: {value!r}") from exc


@attrs.frozen(kw_only=True)
class UpdateTestSeams:
    """``[update.testing]``: seams for tests only, off by default; a box never sets them."""

    # The installer's executable instead of `rauc` (the default suite cannot write real slots).
    rauc: str = ""
    # A file read instead of /proc/cmdline for the booted slot (`rauc.slot=`).
    cmdline: str = ""
    # A file read instead of /proc/sys/kernel/random/boot_id (a new one at every boot).
    boot_id: str = ""


@attrs.frozen(kw_only=True)
class UpdateConfig:
    """``[update]``: firmware updates from the platform (docs/updates.md)."""

    enabled: bool = True
    # When an install (and its reboot) may start, in the shop's local time; never during
    # trading hours by default. "00:00-00:00": any time.
    window: str = attrs.field(default="02:00-05:00", validator=_window)
    # The shop's time zone for the window; empty: the box's own (the image's is UTC).
    timezone: str = attrs.field(default="", validator=_timezone)
    # After booting a new slot: READY and the core health checks must pass within this long,
    # or the box goes back to the previous slot.
    trial_deadline_s: float = attrs.field(default=600.0, validator=_positive)
    # How often the trial looks at health, and how long a failed download or install
    # waits before the next try (doubling up to retry_max_s).
    check_interval_s: float = attrs.field(default=5.0, validator=_positive)
    retry_initial_s: float = attrs.field(default=60.0, validator=_positive)
    retry_max_s: float = attrs.field(default=3600.0, validator=_positive)
    # The certificate(s) a bundle's signature must chain to (the image ships the project's).
    keyring: str = "/etc/rauc/keyring.pem"
    # A bundle a person brings (the homepage's upload, a USB stick): the largest taken (a
    # bundle is 240-300 MiB; room for growth), and how long an upload may take in all
    # (300 MiB on a slow shop Wi-Fi; a stalled one is cut by [http] read_timeout_s first).
    upload_max_bytes: int = attrs.field(default=768 * 2**20, validator=_bundle_size)
    upload_deadline_s: float = attrs.field(default=1800.0, validator=_positive)
    # The inbox the system fills from a USB stick or the boot partition: how often it is
    # looked at, and when what it holds is installed ("now": a person plugged it in).
    inbox_interval_s: float = attrs.field(default=5.0, validator=_positive)
    inbox_when: str = attrs.field(default="now", validator=_one_of("now", "window"))
    testing: UpdateTestSeams = attrs.field(factory=UpdateTestSeams)


@attrs.frozen(kw_only=True)
class Config:
    lan: LanConfig = attrs.field(factory=LanConfig)
    network: NetworkConfig = attrs.field(factory=NetworkConfig)
    storage: StorageConfig = attrs.field(factory=StorageConfig)
    admin: AdminConfig = attrs.field(factory=AdminConfig)
    http: HttpConfig = attrs.field(factory=HttpConfig)
    supervisor: SupervisorConfig = attrs.field(factory=SupervisorConfig)
    log: LogConfig = attrs.field(factory=LogConfig)
    logs: LogsConfig = attrs.field(factory=LogsConfig)
    discovery: DiscoveryConfig = attrs.field(factory=DiscoveryConfig)
    devices: tuple[DeviceDecl, ...] = ()
    dispatch: DispatchConfig = attrs.field(factory=DispatchConfig)
    wan: WanConfig = attrs.field(factory=WanConfig)
    cloud: CloudConfig = attrs.field(factory=CloudConfig)
    orders: OrdersConfig = attrs.field(factory=OrdersConfig)
    support: SupportConfig = attrs.field(factory=SupportConfig)
    media: MediaConfig = attrs.field(factory=MediaConfig)
    events: EventsConfig = attrs.field(factory=EventsConfig)
    cors: CorsConfig = attrs.field(factory=CorsConfig)
    update: UpdateConfig = attrs.field(factory=UpdateConfig)

    def __attrs_post_init__(self) -> None:
        ids = [d.id for d in self.devices]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"device ids declared twice: {', '.join(dupes)}")


# --- loading ------------------------------------------------------------------


def _strict(kind: type[T], accept: tuple[type, ...]) -> Any:
    names = " or ".join(a.__name__ for a in accept)

    def structure(value: object, _type: object) -> T:
        # bool is an int subclass: never accept True where a number is meant.
        if isinstance(value, bool) and bool not in accept:
            raise TypeError(f"expected {names}, got bool")
        if not isinstance(value, accept):
            raise TypeError(f"expected {names}, got {type(value).__name__}")
        return kind(value)  # type: ignore[call-arg]

    return structure


def _converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(int, _strict(int, (int,)))
    conv.register_structure_hook(float, _strict(float, (int, float)))
    conv.register_structure_hook(str, _strict(str, (str,)))
    conv.register_structure_hook(bool, _strict(bool, (bool,)))
    return conv


_CONVERTER: Final = _converter()


def parse_config(data: Mapping[str, Any], *, source: str = "config") -> Config:
    """Structure a TOML-shaped mapping into :class:`Config`, or raise :class:`ConfigError`."""
    return structure_strict(data, Config, source=source)


def structure_strict(data: Mapping[str, Any], cls: type[T], *, source: str) -> T:
    """Structure ``data`` into the attrs class ``cls`` with the configuration's rules
    (unknown keys refused, strict scalars), or raise :class:`ConfigError` with path-named
    lines. Other files with the same rules (the boot partition's setup file) use it too."""
    try:
        return _CONVERTER.structure(dict(data), cls)
    except (ClassValidationError, IterableValidationError, ForbiddenExtraKeysError) as exc:
        raise ConfigError(flatten(exc, noun="key", top="(top level)")) from exc
    except FieldError as exc:
        raise ConfigError([f"{exc.field}: {exc}"]) from exc
    except (TypeError, ValueError) as exc:
        # Raised by a class-level check (__attrs_post_init__) after its fields were fine.
        raise ConfigError([f"{source}: {exc}"]) from exc


def find_config_path(explicit: str | None, env: Mapping[str, str] = os.environ) -> Path | None:
    """``--config``, else ``$APPLIANCE_CONFIG``, else the system file if present, else None."""
    if explicit:
        return Path(explicit)
    if env.get(ENV_CONFIG):
        return Path(env[ENV_CONFIG])
    if DEFAULT_CONFIG_PATH.is_file():
        return DEFAULT_CONFIG_PATH
    return None


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file's data, or :class:`ConfigError` naming the file."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text: {exc}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from exc


def merge_tables(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, table by table; ``extra`` wins."""
    out = dict(base)
    for key, value in extra.items():
        old = out.get(key)
        out[key] = merge_tables(old, value) if isinstance(value, Mapping) and isinstance(old, Mapping) else value
    return out


def load_config(explicit: str | None = None, env: Mapping[str, str] = os.environ) -> tuple[Config, Path | None]:
    """Load the effective configuration and say which file it came from (None: defaults).

    The shop's own settings (:data:`SETTINGS_FILE` in the state directory, written from
    the boot partition's setup file and the homepage) are merged over the file."""
    path = find_config_path(explicit, env)
    data = read_toml(path) if path is not None else {}
    base = parse_config(data, source=str(path or "config"))
    settings = Path(base.storage.dir) / SETTINGS_FILE
    if not settings.is_file():
        return base, path
    extra = read_toml(settings)
    extra.pop("storage", None)  # the state directory is where this file lives: not its to move
    try:
        return parse_config(merge_tables(data, extra), source=str(settings)), path
    except ConfigError as exc:
        raise ConfigError([f"{settings}: {line}" for line in exc.errors]) from exc


_SECRET_KEYS: Final = frozenset({"token", "sas_key", "api_key", "key"})
_URL_KEYS: Final = frozenset({"proxy"})  # may hold user:password@


def to_toml_dict(config: Config, *, mask_secrets: bool = True) -> dict[str, Any]:
    """The configuration as plain data (for ``config show``), secrets masked (and the
    credentials of a proxy URL)."""

    def mask_one(key: str, value: Any) -> Any:
        if mask_secrets and key in _SECRET_KEYS and value:
            return "***"
        if mask_secrets and key in _URL_KEYS and isinstance(value, str):
            return redact_url(value)
        return mask(value)

    def mask(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: mask_one(k, v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [mask(v) for v in value]
        return value

    return mask(_CONVERTER.unstructure(config))  # type: ignore[no-any-return]

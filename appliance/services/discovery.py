"""Discovery on UDP ``lan.ports.discovery`` (57854): replies, beacons, and the registry feed.

Three tasks share one socket (SO_BROADCAST, IP_PKTINFO), bound to ``lan.bind`` (an
IPv4 address; ``0.0.0.0`` is needed to hear broadcasts):

- the receiver decodes each datagram (:mod:`appliance.protocol.discovery`); a valid probe
  within the rate limits (:mod:`appliance.protocol.ratelimit`) gets a unicast announce
  and feeds the registry writer; the box's own beacons, other boxes' announces and
  invalid datagrams are counted and dropped, never raised;
- the beacon sends an announce to the broadcast address of each up IPv4 interface (or to
  ``discovery.broadcast``) at start, as soon as the addresses change, and every
  ``discovery.interval_s`` with jitter;
- the registry writer records probes in the device registry through a bounded channel,
  so a slow disk never delays a reply; a full channel drops the sighting (the device
  probes again) and counts it.

Which address to announce. A reply carries the box's address *on the interface the probe
came in on*, read from the IP_PKTINFO ancillary data of that very datagram
(``ipi_spec_dst``: the receiving interface's address, chosen by the kernel to suit the
sender). A route lookup towards the sender (a connected UDP socket) gives the address of
the interface the kernel would *send* on, which is the wrong one when the device's
address does not match the subnet of the link it is on (a mis-set static address, a
link-local 169.254 address, two interfaces in one subnet): the answer would name an
address the device cannot reach -- the failure UniFi's and SSDP's discovery are known for.
The reply also goes out through the same interface (``ipi_ifindex`` on sendmsg), so it
reaches such a device even when no route to it exists. The route lookup is only the
fallback for beacons sent to a configured address that is no interface's broadcast.

Cancellation: the tasks hold no state that outlives them; the socket closes on exit.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Final

import attrs
import trio

from appliance import __version__
from appliance.protocol import discovery as wire
from appliance.protocol.health import Check, Status
from appliance.protocol.identity import Replayed
from appliance.protocol.ratelimit import RateLimiter, RateVerdict
from appliance.protocol.text import Text, join
from appliance.services.http import BindError
from appliance.services.netif import Interface, beacon_interfaces, interfaces, route_source
from appliance.services.runtime import Runtime
from appliance.storage.devices import PENDING_RETENTION_S, get_device, prune_pending, record_probe, sync_declared

__all__ = [
    "DiscoveryBindError",
    "Limits",
    "paired_store",
    "run_device_registry",
    "run_discovery",
]

log = logging.getLogger(__name__)

BeaconSend = Callable[[bytes, tuple[str, int]], Awaitable[None]]
InterfaceSource = Callable[[], list[Interface]]
StoreSource = Callable[[], wire.StoreIdentity | None]

# <linux/in.h>; Python 3.11's socket module does not export it (3.12 does).
IP_PKTINFO: Final = getattr(socket, "IP_PKTINFO", 8)
_PKTINFO: Final = struct.Struct("@i4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr
# Larger than MAX_DATAGRAM so an oversize datagram is seen (and counted) as such.
RECV_BUFFER: Final = 2048
# Sightings waiting for the registry writer; a shop's devices are tens.
REGISTRY_QUEUE: Final = 64
# How often the interfaces are re-read to catch an address change (DHCP, a cable moved).
ADDRESS_POLL_S: Final = 2.0
BEACON_JITTER: Final = 0.1
# A probe that changes nothing rewrites last_seen at most this often (SD card wear).
REFRESH_EVERY_S: Final = 60.0
_RECENT_MAX: Final = 1024
# How often stale pending devices are pruned.
PRUNE_EVERY_S: Final = 3600.0
# Receive errors that are about one peer (an ICMP error queued on the socket), not the socket.
_TRANSIENT: Final = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENOBUFS,
                               errno.EAGAIN, errno.EINTR})
# Probes of this kind, or with command port 0, come from tools (``appliance discover``, a LAN
# check): answered, never registered.
TOOL_KIND: Final = "tool"


@attrs.frozen(kw_only=True)
class Limits:
    """Reply rate limits. A burst of 5 lets a booting device retry quickly; the global cap
    bounds what a flood of forged sources can make the box send (20 x ~400 B/s)."""

    rate_per_s: float = 0.5
    burst: float = 5
    global_rate_per_s: float = 20.0
    global_burst: float = 50

    def limiter(self) -> RateLimiter:
        return RateLimiter(rate_per_s=self.rate_per_s, burst=self.burst,
                           global_rate_per_s=self.global_rate_per_s, global_burst=self.global_burst)


class DiscoveryBindError(BindError):
    """The discovery port cannot be bound; one line for a person."""

    def __init__(self, *, host: str, port: int, cause: OSError) -> None:
        super().__init__(role="discovery", host=host, port=port, cause=cause)
        if cause.errno == errno.EADDRINUSE:
            fix = (f"another program holds it (`ss -lunp 'sport = :{port}'` shows which; another appliance?); "
                   "stop it or set [lan.ports] discovery")
        elif cause.errno == errno.EACCES:
            fix = "check [lan.ports] discovery"
        else:
            fix = "check [lan] bind and [lan.ports] discovery"
        self.args = (f"cannot bind udp {host}:{port} for discovery: {cause.strerror or cause}; {fix}",)

    def __str__(self) -> str:
        return str(self.args[0])


_unannounceable: set[str] = set()


def paired_store(runtime: Runtime) -> wire.StoreIdentity | None:
    """The store id and HMAC secret while the box is paired (``runtime.store``), else None.

    A pairing the platform refused (``needs_repair``) no longer vouches for the box: it
    announces itself unsigned and without a store until paired again. A pairing without a
    store secret announces the store id, unsigned.
    """
    link = runtime.store
    if link is None or link.needs_repair:
        return None
    if not wire.valid_id(link.store_id):
        if link.store_id not in _unannounceable:  # once per id, not once per announce
            _unannounceable.add(link.store_id)
            log.warning("store id %r cannot be announced (see docs/discovery.md); announcing unpaired",
                        link.store_id)
        return None
    return wire.StoreIdentity(store_id=link.store_id, secret=link.store_secret.encode("utf-8"))


@attrs.frozen(kw_only=True)
class _Sighting:
    device_id: str
    kind: str
    name: str
    address: str
    port: int
    # A signed probe's datagram and its ts and nonce, checked against the device's key by
    # the registry writer (which reads the registry); None for an unsigned probe.
    signed: bytes | None = attrs.field(default=None, eq=False)
    ts: float | None = None
    nonce: str = ""


def _bind_host(runtime: Runtime) -> str:
    host = runtime.config.lan.bind
    return host if ":" not in host else "0.0.0.0"  # discovery is IPv4: broadcast has no IPv6 twin


def open_socket() -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    except OSError:
        sock.close()
        raise
    return sock


def _pktinfo(ancdata: list[tuple[int, int, bytes]]) -> tuple[int, str] | None:
    """(ifindex, local address) from IP_PKTINFO ancillary data, if present."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= _PKTINFO.size:
            ifindex, spec_dst, _dst = _PKTINFO.unpack_from(data)
            local = socket.inet_ntoa(spec_dst)
            if local != "0.0.0.0":
                return ifindex, local
    return None


class _Discovery:
    def __init__(
        self,
        runtime: Runtime,
        sock: trio.socket.SocketType,
        *,
        beacon_send: BeaconSend | None,
        interface_source: InterfaceSource,
        store: StoreSource,
        limits: Limits,
        rng: random.Random,
    ) -> None:
        self.runtime = runtime
        self.config = runtime.config.discovery
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self._beacon_send = beacon_send or self._sendto
        self._interfaces = interface_source
        self._store = store
        self._limiter = limits.limiter()
        self._schedule = wire.BeaconSchedule(self.config.interval_s, jitter=BEACON_JITTER, rng=rng)
        self.name = wire.clean_name(self.config.name or socket.gethostname()) or runtime.appliance_id
        self.targets: tuple[tuple[str, str], ...] = ()
        self.beacon_errors: dict[str, str] = {}
        self.last_beacon: float | None = None
        send, self._receive = trio.open_memory_channel[_Sighting](REGISTRY_QUEUE)
        self._send = send
        m = runtime.metrics
        m.describe_counter("discovery_probes", "valid discovery probes received")
        m.describe_counter("discovery_replies", "announces sent in reply to probes")
        m.describe_counter("discovery_beacons", "beacon announces sent")
        m.describe_counter("discovery_rate_limited", "probes left unanswered by the rate limits, by scope")
        m.describe_counter("discovery_invalid", "discovery datagrams dropped as invalid, by reason")
        m.describe_counter("discovery_announces_seen", "announces received (own beacons, other boxes)")
        m.describe_counter("discovery_send_errors", "discovery datagrams the kernel refused to send")
        m.describe_counter("discovery_registry_dropped", "probes not recorded because the registry queue was full")
        m.describe_counter("discovery_moves_refused",
                           "probes that asked to move a known device and were not signed with its key, by reason")
        m.describe_counter("discovery_pending_refused", "new devices not recorded: pending list full, by scope")

    # --- the announce --------------------------------------------------------------

    def announce(self, address: str, nonce: str | None) -> bytes:
        store = self._store()
        message = wire.Announce(appliance_id=self.runtime.appliance_id,
                                store_id=store.store_id if store else None, name=self.name,
                                firmware=__version__, address=address, ports=dict(self.runtime.ports),
                                nonce=nonce, ts=time.time())
        return wire.sign(message, store.secret) if store and store.secret else wire.encode(message)

    async def _sendto(self, data: bytes, target: tuple[str, int]) -> None:
        await self.sock.sendto(data, target)

    # --- receiving -----------------------------------------------------------------

    async def receive_loop(self) -> None:
        while True:
            try:
                data, ancdata, _flags, source = await self.sock.recvmsg(RECV_BUFFER, socket.CMSG_SPACE(_PKTINFO.size))
            except OSError as exc:
                if exc.errno not in _TRANSIENT:
                    raise
                self.runtime.metrics.inc("discovery_invalid", reason="socket_error")
                continue
            # A datagram longer than RECV_BUFFER arrives cut (MSG_TRUNC) but still longer than
            # MAX_DATAGRAM, so decode() counts it as too large.
            await self.handle(data, ancdata, source)  # type: ignore[arg-type]  # AF_INET: (host, port)

    async def handle(self, data: bytes, ancdata: list[tuple[int, int, bytes]], source: tuple[str, int]) -> None:
        metrics = self.runtime.metrics
        try:
            message = wire.decode(data)
        except wire.DiscoveryError as exc:
            metrics.inc("discovery_invalid", reason=exc.reason)
            log.debug("dropped a datagram from %s:%d: %s", source[0], source[1], exc)
            return
        if isinstance(message, wire.Announce):
            own = message.appliance_id == self.runtime.appliance_id
            metrics.inc("discovery_announces_seen", origin="own" if own else "other")
            if not own:
                log.debug("another box %s announces itself at %s", message.appliance_id, message.address)
            return
        metrics.inc("discovery_probes")
        verdict = self._limiter.allow(source[0], trio.current_time())
        if verdict is not RateVerdict.ALLOWED:
            metrics.inc("discovery_rate_limited", scope=str(verdict))
            return
        await self._reply(message, ancdata, source)
        if message.kind != TOOL_KIND and message.port != 0:
            self._record(message, source[0], data if message.sig is not None else None)

    async def _reply(self, probe: wire.Probe, ancdata: list[tuple[int, int, bytes]], source: tuple[str, int]) -> None:
        info = _pktinfo(ancdata)
        ifindex, local = info if info is not None else (0, route_source(source[0]))
        if local is None or source[0] == "0.0.0.0" or source[1] == 0:
            self.runtime.metrics.inc("discovery_send_errors", what="reply")
            return
        try:
            data = self.announce(local, probe.nonce)
            cmsg = [(socket.IPPROTO_IP, IP_PKTINFO, _PKTINFO.pack(ifindex, socket.inet_aton(local), bytes(4)))]
            await self.sock.sendmsg([data], cmsg, 0, source)
        except OSError as exc:
            self.runtime.metrics.inc("discovery_send_errors", what="reply")
            log.debug("reply to %s:%d failed: %s", source[0], source[1], exc)
            return
        self.runtime.metrics.inc("discovery_replies")

    def _record(self, probe: wire.Probe, address: str, signed: bytes | None) -> None:
        sighting = _Sighting(device_id=probe.device_id, kind=probe.kind, name=probe.name, address=address,
                             port=probe.port, signed=signed, ts=probe.ts, nonce=probe.nonce)
        try:
            self._send.send_nowait(sighting)
        except trio.WouldBlock:
            self.runtime.metrics.inc("discovery_registry_dropped")

    async def registry_writer(self) -> None:
        recent: dict[str, tuple[_Sighting, float]] = {}
        async for s in self._receive:
            seen = recent.get(s.device_id)
            if seen is not None and seen[0] == s and trio.current_time() - seen[1] < REFRESH_EVERY_S:
                continue
            signed = await self._signed_by_device(s) if s.signed is not None else False
            result = await self.runtime.db.write(partial(
                record_probe, device_id=s.device_id, kind=s.kind, name=s.name, address=s.address, port=s.port,
                now=time.time(), signed=signed))
            if result.refused is not None:
                self.runtime.metrics.inc("discovery_pending_refused", scope=result.refused)
                log.debug("new device %s from %s not recorded: pending list %s", s.device_id, s.address,
                          result.refused)
                continue
            if result.ignored:
                self.runtime.metrics.inc("discovery_moves_refused",
                                         reason="unsigned" if s.signed is None else "bad_signature")
                log.info("device %s: a probe from %s:%d asked to move it and was not signed with its key; ignored",
                         s.device_id, s.address, s.port)
            if len(recent) >= _RECENT_MAX:
                recent.clear()
            recent[s.device_id] = (s, trio.current_time())
            if result.created:
                log.info("new device %s (%s, %r) at %s:%d: pending adoption", s.device_id, s.kind, s.name,
                         s.address, s.port)
            if result.changed:
                self.runtime.device_changes.notify()

    async def _signed_by_device(self, s: _Sighting) -> bool:
        """Whether a signed probe is signed with the device's own key, fresh and not replayed."""
        device = await self.runtime.db.read(partial(get_device, device_id=s.device_id))
        key = self.runtime.keys.key_of(device) if device is not None else None
        if key is None or s.signed is None or s.ts is None or not wire.verify(s.signed, key):
            return False
        try:
            self.runtime.keys.guard(s.device_id).check(f"probe:{s.nonce}", s.ts, time.time())
        except Replayed:
            return False
        return True

    # --- beacons -------------------------------------------------------------------

    def beacon_targets(self) -> tuple[tuple[str, str], ...]:
        """(destination, the box's address as seen from there) for each beacon."""
        found = self._interfaces()
        if not self.config.broadcast:
            return tuple((i.broadcast, i.address) for i in beacon_interfaces(found) if i.broadcast)
        targets = []
        for dest in self.config.broadcast:
            if ipaddress.ip_address(dest).version != 4:
                continue  # IPv6 has no broadcast
            match = next((i for i in found if dest in (i.broadcast, i.address)), None)
            address = match.address if match is not None else route_source(dest)
            if address is not None:
                targets.append((dest, address))
        return tuple(targets)

    async def beacon_loop(self) -> None:
        while True:
            now = trio.current_time()
            self.targets = self.beacon_targets()
            if self._schedule.addresses_seen(self.targets, now):
                log.info("discovery beacons to %s", ", ".join(f"{d} (as {a})" for d, a in self.targets) or "nowhere: "
                         "no up IPv4 interface with a broadcast address")
            if self._schedule.due(now):
                for dest, address in self.targets:
                    await self._beacon_once(dest, address)
                self._schedule.sent(now)
                self.last_beacon = time.time()
            await trio.sleep_until(min(self._schedule.next_due, now + ADDRESS_POLL_S))

    async def _beacon_once(self, dest: str, address: str) -> None:
        try:
            await self._beacon_send(self.announce(address, None), (dest, self.port))
        except OSError as exc:
            self.runtime.metrics.inc("discovery_send_errors", what="beacon")
            message = exc.strerror or str(exc)
            if self.beacon_errors.get(dest) != message:
                log.warning("beacon to %s:%d failed: %s", dest, self.port, message)
            self.beacon_errors[dest] = message
            return
        self.beacon_errors.pop(dest, None)
        self.runtime.metrics.inc("discovery_beacons")

    # --- health --------------------------------------------------------------------

    async def health(self) -> list[Check]:
        data = {"port": self.port, "targets": [d for d, _ in self.targets], "last_beacon": self.last_beacon}
        if not self.targets:
            return [Check(name="discovery", status=Status.WARN, data=data,
                          message=Text("answering probes on udp/{port}, but no beacon can go out: "
                                       "no up IPv4 interface with a broadcast address", port=self.port),
                          fix=Text("connect the box to the shop network and check it has an address (DHCP), "
                                   "or set [discovery] broadcast"))]
        if self.beacon_errors:
            errors = "; ".join(f"{d}: {e}" for d, e in sorted(self.beacon_errors.items()))
            return [Check(name="discovery", status=Status.WARN, data=data,
                          message=Text("beacons fail: {errors}", errors=errors),
                          fix=Text("check the firewall allows udp/57854 out to the LAN, and [discovery] broadcast"))]
        where = join(", ", (Text("{device} as {address}", device=d, address=a) for d, a in self.targets))
        return [Check(name="discovery", status=Status.OK, data=data,
                      message=Text("answering probes on udp/{port}; beacons every {seconds} s to {where}",
                                   port=self.port, seconds=format(self.config.interval_s, "g"), where=where))]


async def run_discovery(
    runtime: Runtime,
    *,
    beacon_send: BeaconSend | None = None,
    interface_source: InterfaceSource = interfaces,
    store: StoreSource | None = None,
    limits: Limits | None = None,
    rng: random.Random | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve discovery until cancelled; started() gives the bound UDP port.

    ``beacon_send`` replaces the socket for beacons only (tests: nothing is broadcast);
    ``store`` says whether (and as which store) the box is paired: default
    :func:`paired_store`.
    """
    host, port = _bind_host(runtime), runtime.ports.of("discovery")
    sock = open_socket()
    with sock:
        try:
            await sock.bind((host, port))
        except OSError as exc:
            raise DiscoveryBindError(host=host, port=port, cause=exc) from exc
        service = _Discovery(runtime, sock, beacon_send=beacon_send, interface_source=interface_source,
                             store=store or partial(paired_store, runtime), limits=limits or Limits(),
                             rng=rng or random.Random())
        runtime.ports.bind("discovery", service.port)
        runtime.health.add("discovery", service.health)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.registry_writer)
            nursery.start_soon(service.receive_loop)
            nursery.start_soon(service.beacon_loop)
            runtime.board.say("discovery", f"udp/{service.port}")
            log.info("discovery on udp %s:%d", host, service.port)
            task_status.started(service.port)


async def run_device_registry(
    runtime: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Make the registry match ``[[devices]]`` at start, then prune stale pending devices."""
    declared = runtime.config.devices
    changed = await runtime.db.write(partial(sync_declared, declared=declared, now=time.time()))
    runtime.keys.set_declared({d.id: d.key for d in declared})
    if changed:
        runtime.device_changes.notify()
    runtime.board.say("devices", Text("{count} declared", count=len(declared)))
    task_status.started()
    while True:
        pruned = await runtime.db.write(partial(prune_pending, now=time.time(), retention_s=PENDING_RETENTION_S))
        if pruned:
            log.info("forgot %d pending device(s) silent for %g days: %s", len(pruned), PENDING_RETENTION_S / 86400,
                     ", ".join(pruned))
            runtime.device_changes.notify()
        await trio.sleep(PRUNE_EVERY_S)

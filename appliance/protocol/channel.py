"""One device's send window on the device channel: sans-I/O, no socket, no clock.

The driver (``appliance.services.dispatcher``) feeds it commands from the outbox
(:meth:`SendWindow.offer`), connection events, the device's messages and the time, and
asks it what to send next (:meth:`SendWindow.next_transmit`). What must be made durable
comes out of :meth:`SendWindow.take_records` (sent, acked, dead).

Rules (docs/architecture.md §7, docs/device-channel.md):

- At most ``window`` commands are unacknowledged on a connection; commands go out in seq
  order, and a command is never sent while a lower one is waiting to be (re)sent, so the
  device sees seqs rise except when the box goes back.
- An ack settles a command once; later acks of it are counted and ignored.
- A nack with ``retry: false`` makes the command dead with the device's reason. A nack
  with ``retry: true`` goes back: every command in flight, from the lowest (even one below
  the nacked seq), is sent again, in order, after a hold that doubles with each retry in a
  row (reset by an ack). Going back only to the nacked seq is not enough: a nack can be
  about an older copy of a command already sent again, and a device that follows the
  in-order rule of docs/device-channel.md would then take the later seq before a lower
  one still in flight.
- A lost connection makes every command in flight unsent again; after the next hello
  they are sent again in order (at-least-once; the device dedupes by id).
- A command whose ``expires_at`` has passed is never sent: it becomes dead ("expired").
- No hello within ``hello_timeout_s`` of connecting, or commands in flight and no answer
  (ack or nack of a command in flight: answers about unknown or settled ids are not
  progress) for ``ack_timeout_s`` since the oldest was sent or the last answer came,
  raises :class:`LinkStalled`: the driver drops the connection and reconnects with
  backoff. (A slow device that keeps answering is busy, not stalled.)
- The first message must be a hello from the expected device; anything else raises
  :class:`ChannelProtocolError` (a wrong device at that address must never get commands).
- A ``ticket`` message (the device's own button) asks for the box's status ticket on that
  device: :meth:`SendWindow.take_ticket_request` says so once, at most once every
  ``ticket_interval_s`` (a stuck button or a chatty device prints no roll of tickets).
  It is not an answer: it does not hold the stall timer off.

Connection states, as a table (:data:`TRANSITIONS`)::

    disconnected --connect--> greeting --hello--> open
    greeting/open --disconnect--> disconnected;  open --ack/nack/ticket--> open
"""

from __future__ import annotations

import enum
import heapq
from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import Final

import attrs

from appliance.protocol.channel_codec import (
    Ack,
    AskTicket,
    Auth,
    ChannelProtocolError,
    Command,
    DeviceMessage,
    Hello,
    LinkStalled,
    Nack,
)

__all__ = ["TRANSITIONS", "Acked", "ChannelState", "Dead", "Record", "SendWindow", "Sent", "WindowStats"]

DEFAULT_WINDOW: Final = 32
# A device's button asks for one status ticket at most this often.
TICKET_INTERVAL_S: Final = 30.0
# How many acked ids are remembered to tell a duplicate ack from an unknown one (stats only).
_REMEMBERED_ACKS: Final = 1024


class ChannelState(enum.StrEnum):
    DISCONNECTED = "disconnected"
    GREETING = "greeting"  # connected; waiting for the device's hello
    OPEN = "open"


class _Input(enum.Enum):
    CONNECT = "connect"
    HELLO = "hello"
    ACK = "ack"
    NACK = "nack"
    TICKET = "ticket"
    DISCONNECT = "disconnect"


TRANSITIONS: Final[dict[tuple[ChannelState, _Input], ChannelState]] = {
    (ChannelState.DISCONNECTED, _Input.CONNECT): ChannelState.GREETING,
    (ChannelState.DISCONNECTED, _Input.DISCONNECT): ChannelState.DISCONNECTED,
    (ChannelState.GREETING, _Input.HELLO): ChannelState.OPEN,
    (ChannelState.GREETING, _Input.DISCONNECT): ChannelState.DISCONNECTED,
    (ChannelState.OPEN, _Input.ACK): ChannelState.OPEN,
    (ChannelState.OPEN, _Input.NACK): ChannelState.OPEN,
    (ChannelState.OPEN, _Input.TICKET): ChannelState.OPEN,
    (ChannelState.OPEN, _Input.DISCONNECT): ChannelState.DISCONNECTED,
}
_INPUT_OF: Final = {Hello: _Input.HELLO, Ack: _Input.ACK, Nack: _Input.NACK, AskTicket: _Input.TICKET}


@attrs.frozen(kw_only=True)
class Sent:
    id: str
    seq: int
    at: float


@attrs.frozen(kw_only=True)
class Acked:
    id: str
    seq: int
    at: float


@attrs.frozen(kw_only=True)
class Dead:
    id: str
    seq: int
    reason: str
    at: float


Record = Sent | Acked | Dead


@attrs.define(kw_only=True)
class WindowStats:
    sent: int = 0
    resent: int = 0
    acked: int = 0
    dead: int = 0
    duplicate_acks: int = 0
    unknown_acks: int = 0
    retry_nacks: int = 0


class _Slot(enum.Enum):
    UNSENT = "unsent"
    IN_FLIGHT = "in_flight"


@attrs.define(kw_only=True)
class _Entry:
    command: Command
    slot: _Slot = _Slot.UNSENT
    sends: int = 0


class SendWindow:
    """The send window of one device. ``capacity`` bounds how many commands it holds."""

    def __init__(
        self,
        *,
        device_id: str,
        window: int = DEFAULT_WINDOW,
        capacity: int | None = None,
        hello_timeout_s: float = 10.0,
        ack_timeout_s: float = 30.0,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 30.0,
        ticket_interval_s: float = TICKET_INTERVAL_S,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be 1 or more, got {window}")
        self.device_id = device_id
        self.window = window
        # Commands held beyond the window are the next ones to send; 4 windows keeps the
        # pipe full between outbox reads without holding a backlog in memory.
        self.capacity = capacity if capacity is not None else 4 * window
        if self.capacity < window:
            raise ValueError(f"capacity ({self.capacity}) must be at least the window ({window})")
        self.hello_timeout_s = hello_timeout_s
        self.ack_timeout_s = ack_timeout_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.ticket_interval_s = ticket_interval_s
        self._ticket_asked = False
        self._ticket_at: float | None = None  # when the last request was taken
        self.state = ChannelState.DISCONNECTED
        self.stats = WindowStats()
        self.hello: Hello | None = None
        self.last_seq = 0  # the highest seq ever offered
        self._entries: dict[str, _Entry] = {}  # id -> entry; insertion order is seq order
        self._unsent: list[tuple[int, str]] = []  # heap of (seq, id); stale items skipped
        self._expiries: list[tuple[float, str]] = []  # heap of (expires_at, id); stale items skipped
        self._in_flight: OrderedDict[str, float] = OrderedDict()  # id -> sent at, oldest first
        self._hello_deadline: float | None = None
        self._last_answer = 0.0  # when the device last acked or nacked, this connection
        self._hold_until = 0.0
        self._retry_streak = 0
        self._draining = False
        self._records: list[Record] = []
        self._acked_recently: deque[str] = deque(maxlen=_REMEMBERED_ACKS)

    # --- what the driver reads ---------------------------------------------------

    @property
    def pending(self) -> int:
        """Commands held and not yet settled (unsent or in flight)."""
        return len(self._entries)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def room(self) -> int:
        """How many more commands :meth:`offer` may take now."""
        return self.capacity - len(self._entries)

    @property
    def idle(self) -> bool:
        """Nothing in flight: a draining link may close now."""
        return not self._in_flight

    @property
    def unrecorded(self) -> int:
        """Records waiting for :meth:`take_records`."""
        return len(self._records)

    @property
    def oldest_unrecorded_at(self) -> float | None:
        """When the oldest record waiting for :meth:`take_records` happened (None: none waits)."""
        return self._records[0].at if self._records else None

    def take_records(self) -> list[Record]:
        """What happened since the last call, in order, for the outbox to make durable."""
        records, self._records = self._records, []
        return records

    # --- inputs ------------------------------------------------------------------

    def offer(self, commands: Iterable[Command]) -> None:
        """Hold more commands. Seqs must rise above every seq offered before."""
        for command in commands:
            if command.seq <= self.last_seq:
                raise ValueError(f"seq {command.seq} offered after {self.last_seq}: seqs must rise")
            if len(self._entries) >= self.capacity:
                raise ValueError(f"the window holds {self.capacity} commands already; check room() first")
            self.last_seq = command.seq
            self._entries[command.id] = _Entry(command=command)
            heapq.heappush(self._unsent, (command.seq, command.id))
            if command.expires_at is not None:
                heapq.heappush(self._expiries, (command.expires_at, command.id))

    def connection_made(self, now: float) -> None:
        self._move(_Input.CONNECT)
        self.hello = None
        self._hello_deadline = now + self.hello_timeout_s
        self._last_answer = now

    def connection_lost(self, now: float) -> None:
        """The connection ended (for any reason): everything in flight is unsent again."""
        self._move(_Input.DISCONNECT)
        self._hello_deadline = None
        for command_id in list(self._in_flight):
            self._unsend(command_id)

    def receive(self, message: DeviceMessage, now: float) -> None:
        """A message from the device. Raises :class:`ChannelProtocolError` if v1 forbids it here."""
        if isinstance(message, Auth):  # the hello's proofs are the driver's, before the window opens
            raise ChannelProtocolError("the device sent auth outside the hello")
        step = _INPUT_OF[type(message)]
        if (self.state, step) not in TRANSITIONS:
            if self.state is ChannelState.GREETING:
                raise ChannelProtocolError(f"the device sent {step.value} before its hello")
            if self.state is ChannelState.OPEN:
                raise ChannelProtocolError("the device sent a second hello on one connection")
            raise RuntimeError(f"receive() while {self.state}")
        if isinstance(message, Hello):
            if message.device_id != self.device_id:
                raise ChannelProtocolError(f"the device at this address says it is {message.device_id!r}, "
                                           f"not {self.device_id!r}")
            self.hello = message
            self._hello_deadline = None
        elif isinstance(message, AskTicket):
            if self._ticket_at is None or now - self._ticket_at >= self.ticket_interval_s:
                self._ticket_asked, self._ticket_at = True, now
        else:
            # Only an answer about a command in flight is progress: acks of unknown or
            # already settled ids must not hold the stall timer off for ever.
            if message.id in self._in_flight:
                self._last_answer = now
            if isinstance(message, Ack):
                self._on_ack(message.id, now)
            else:
                self._on_nack(message, now)
        self._move(step)

    def take_ticket_request(self) -> bool:
        """Whether the device asked for the status ticket since the last call."""
        asked, self._ticket_asked = self._ticket_asked, False
        return asked

    def drain(self) -> None:
        """Graceful stop: send nothing more; wait for what is in flight (see :attr:`idle`)."""
        self._draining = True

    def next_transmit(self, now: float) -> Command | None:
        """The next command to send now, marked in flight; None if nothing may go yet."""
        self._expire(now)
        if now >= self._hold_until:
            self._hold_until = 0.0
        if self.state is not ChannelState.OPEN or self._draining or self._hold_until:
            return None
        if len(self._in_flight) >= self.window:
            return None
        entry = self._next_unsent()
        if entry is None:
            return None
        heapq.heappop(self._unsent)
        command = entry.command
        entry.slot = _Slot.IN_FLIGHT
        entry.sends += 1
        self._in_flight[command.id] = now
        if entry.sends > 1:
            self.stats.resent += 1
        self.stats.sent += 1
        self._records.append(Sent(id=command.id, seq=command.seq, at=now))
        return command

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must next be called (None: nothing is timed)."""
        times: list[float] = []
        if self._hello_deadline is not None:
            times.append(self._hello_deadline)
        if self._in_flight:
            times.append(self._ack_deadline())
        if self._hold_until and self.state is ChannelState.OPEN and self._next_unsent() is not None:
            times.append(self._hold_until)
        expiry = self._next_expiry()
        if expiry is not None:
            times.append(expiry)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        """Expire what is due; raise :class:`LinkStalled` if the device stopped answering."""
        self._expire(now)
        if now >= self._hold_until:
            self._hold_until = 0.0
        if self._hello_deadline is not None and now >= self._hello_deadline:
            raise LinkStalled(f"no hello within {self.hello_timeout_s:g} s of connecting")
        if self._in_flight and now >= self._ack_deadline():
            seq = self._entries[next(iter(self._in_flight))].command.seq
            raise LinkStalled(f"no ack for command seq {seq} within {self.ack_timeout_s:g} s")

    # --- internals ---------------------------------------------------------------

    def _move(self, step: _Input) -> None:
        try:
            self.state = TRANSITIONS[(self.state, step)]
        except KeyError:
            raise RuntimeError(f"{step.value} is not possible while {self.state}") from None

    def _ack_deadline(self) -> float:
        oldest_sent = next(iter(self._in_flight.values()))
        return max(oldest_sent, self._last_answer) + self.ack_timeout_s

    def _on_ack(self, command_id: str, now: float) -> None:
        entry = self._entries.get(command_id)
        if entry is None:
            if command_id in self._acked_recently:
                self.stats.duplicate_acks += 1
            else:
                self.stats.unknown_acks += 1
            return
        self._settle(entry)
        self._retry_streak = 0
        self._hold_until = 0.0
        self._acked_recently.append(command_id)
        self.stats.acked += 1
        self._records.append(Acked(id=command_id, seq=entry.command.seq, at=now))

    def _on_nack(self, nack: Nack, now: float) -> None:
        entry = self._entries.get(nack.id)
        if entry is None:
            self.stats.unknown_acks += 1
            return
        if not nack.retry:
            self._kill(entry, f"refused by the device: {nack.reason or 'no reason given'}", now)
            return
        if entry.slot is _Slot.UNSENT:
            return  # a stale nack from before a go-back: it is going to be sent again anyway
        self.stats.retry_nacks += 1
        # Back to the lowest command in flight, not to the nacked one: the nack may be about
        # an older copy (sent before the last go-back), and the device may be refusing a
        # lower seq whose nack is still on its way; resending only this seq would let it
        # take this one first (docs/device-channel.md, "Order").
        for command_id in list(self._in_flight):
            self._unsend(command_id)
        self._hold_until = now + min(self.retry_max_s, self.retry_initial_s * 2 ** min(self._retry_streak, 32))
        self._retry_streak += 1

    def _unsend(self, command_id: str) -> None:
        del self._in_flight[command_id]
        entry = self._entries[command_id]
        entry.slot = _Slot.UNSENT
        heapq.heappush(self._unsent, (entry.command.seq, command_id))
        if entry.command.expires_at is not None:
            heapq.heappush(self._expiries, (entry.command.expires_at, command_id))

    def _settle(self, entry: _Entry) -> None:
        del self._entries[entry.command.id]
        self._in_flight.pop(entry.command.id, None)

    def _kill(self, entry: _Entry, reason: str, now: float) -> None:
        self._settle(entry)
        self.stats.dead += 1
        self._records.append(Dead(id=entry.command.id, seq=entry.command.seq, reason=reason, at=now))

    def _next_unsent(self) -> _Entry | None:
        while self._unsent:
            _seq, command_id = self._unsent[0]
            entry = self._entries.get(command_id)
            if entry is not None and entry.slot is _Slot.UNSENT:
                return entry
            heapq.heappop(self._unsent)
        return None

    def _next_expiry(self) -> float | None:
        while self._expiries:
            at, command_id = self._expiries[0]
            entry = self._entries.get(command_id)
            if entry is not None and entry.slot is _Slot.UNSENT:
                return at
            heapq.heappop(self._expiries)  # settled, or in flight (re-pushed if it comes back)
        return None

    def _expire(self, now: float) -> None:
        while (at := self._next_expiry()) is not None and at <= now:
            _at, command_id = heapq.heappop(self._expiries)
            self._kill(self._entries[command_id], "expired before it could be delivered", now)

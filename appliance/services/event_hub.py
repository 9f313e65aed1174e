"""The live side of the event log: one reader, a ring of recent events, many followers.

The event-log service (``appliance.services.event_log``) reads each committed event once
(:meth:`EventHub.load`), makes its message text once, and keeps the newest
``ring_events`` in memory. While nobody subscribes, the text waits for the first subscriber
that takes the event (:meth:`EventHub.from_ring`): a box nobody follows makes none (an RFC
3339 time and the message, ~6 us an event, one per command enqueued). Each subscriber is a
:class:`Follower`: a cursor (the last id it was given) into that ring, so 200 subscribers
share one copy of every message and no subscriber is ever waited for. A follower resuming
from an id older than the ring reads the log itself (:meth:`Follower.next_batch`), page by
page.

A follower's backlog is bounded: once it has caught up after connecting, falling out of
the ring (more than ``ring_events`` behind) or staying behind for longer than
``max_lag_s`` makes it :class:`TooSlow`; the connection then tells the client to resume
from its last id and closes. An id older than the log keeps, or newer than anything the
box ever wrote, is a ``resync`` (:meth:`EventHub.start`), never a silent gap.

Cancellation: followers hold no resources; a cancelled wait loses nothing (the cursor
only moves once a batch has been handed over).
"""

from __future__ import annotations

import bisect
import collections
import datetime
from collections.abc import Callable, Sequence
from functools import partial
from typing import Final, cast

import attrs
import trio

from appliance.protocol.event_stream import StoredEvent, Subscription, encode_event
from appliance.services.signal import ChangeSignal
from appliance.storage import Database
from appliance.storage.event_log import LogBounds, LogRow, page_after

__all__ = ["CATCH_UP_PAGE", "EventHub", "Follower", "TooSlow", "stored_event"]

# Events read from the log per query when a follower catches up from disk.
CATCH_UP_PAGE: Final = 500
# The most events one batch hands to a connection (it sends them, then asks again).
BATCH_MAX: Final = 1000
# Hand-over times kept for /metrics (the newest ones).
HANDOFFS_KEPT: Final = 4096


class TooSlow(Exception):
    """The follower fell too far behind; ``resume_after`` is the last id it was given."""

    def __init__(self, reason: str, resume_after: int) -> None:
        self.reason, self.resume_after = reason, resume_after
        super().__init__(reason)


def rfc3339(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def stored_event(row: LogRow, loaded_at: float = 0.0) -> StoredEvent:
    text = encode_event(id=row.id, type=row.type, topic=row.topic, at_text=rfc3339(row.at), body=row.body)
    return StoredEvent(id=row.id, topic=row.topic, type=row.type, device_id=row.device_id, subject=row.subject,
                       at=row.at, text=text, loaded_at=loaded_at)


class EventHub:
    """The newest events in memory and where the log stands. One per running appliance."""

    def __init__(self, *, ring_events: int) -> None:
        self.ring_events = ring_events
        self._ids: list[int] = []
        # Beside each id: its event, or, for one loaded while nobody subscribed and not taken
        # since, the row as read and when (made into its event at the first take, then shared).
        self._events: list[StoredEvent | tuple[LogRow, float]] = []
        self._lazy_upto = 0  # no event with a higher id waits to be made
        self.head = 0  # the highest id read from the log
        self.oldest = 1  # the first id the log still keeps
        self.changed = ChangeSignal()  # new events in the ring, or the box is stopping
        self.stopping = False
        self.subscribers = 0
        # Seconds from an event's load (just after its commit) to the moment a subscriber's
        # connection takes it to send, for the newest ones (/metrics shows p50 and p99). The
        # send itself is left out: a stalled reader's would say nothing about the others.
        self.handoffs: collections.deque[float] = collections.deque(maxlen=HANDOFFS_KEPT)

    def load(self, rows: Sequence[LogRow]) -> None:
        """Add events read from the log (in id order, all above :attr:`head`)."""
        now = trio.current_time()
        lazy = self.subscribers == 0
        for row in rows:
            self._ids.append(row.id)
            self._events.append((row, now) if lazy else stored_event(row, now))
        if rows and lazy:
            self._lazy_upto = rows[-1].id
        if rows:
            self.head = rows[-1].id
            extra = len(self._ids) - self.ring_events
            # Trim in chunks: amortised O(1) per event instead of a shift per event.
            if extra > self.ring_events // 4:
                del self._ids[:extra]
                del self._events[:extra]
            self.changed.notify()

    def set_bounds(self, bounds: LogBounds) -> None:
        """The log's first id after a prune (the head moves only with :meth:`load`)."""
        self.oldest = bounds.oldest

    def dispatched(self, events: Sequence[StoredEvent]) -> None:
        """A connection took ``events`` to send them now."""
        now = trio.current_time()
        self.handoffs.extend(now - e.loaded_at for e in events if e.loaded_at)

    def handoff_quantiles(self) -> list[tuple[dict[str, str], float]]:
        ordered = sorted(self.handoffs)
        if not ordered:
            return []
        return [({"quantile": str(q)}, ordered[min(len(ordered) - 1, int(len(ordered) * q))]) for q in (0.5, 0.99)]

    def stop(self) -> None:
        self.stopping = True
        self.changed.notify()

    @property
    def ring_start(self) -> int:
        """The first id the ring can serve (events after ``ring_start - 1``)."""
        start = max(0, len(self._ids) - self.ring_events)
        return self._ids[start] if start < len(self._ids) else self.head + 1

    def from_ring(self, cursor: int, limit: int) -> list[StoredEvent] | None:
        """Events after ``cursor`` from memory (at most ``limit``); None if some of them
        are no longer in memory (read the log instead)."""
        if cursor >= self.head:
            return []
        if cursor < self.ring_start - 1:
            return None
        i = bisect.bisect_right(self._ids, cursor)
        events = self._events
        if cursor >= self._lazy_upto:  # every event after cursor is made: a subscriber keeping up
            return cast(list[StoredEvent], events[i:i + limit])
        out: list[StoredEvent] = []
        for j in range(i, min(i + limit, len(events))):
            event = events[j]
            if not isinstance(event, StoredEvent):
                events[j] = event = stored_event(*event)
            out.append(event)
        return out

    def start(self, sub: Subscription) -> tuple[int, bool]:
        """Where a new subscriber starts: (cursor, resync). ``after`` None means live only."""
        after = sub.after
        if after is None:
            return self.head, False
        if after > self.head or after < self.oldest - 1:
            return self.head, True
        return after, False


@attrs.define(eq=False)
class Follower:
    """One subscriber's position. ``next_batch`` waits for events it may see."""

    hub: EventHub
    db: Database
    sub: Subscription
    cursor: int
    max_lag_s: float
    clock: Callable[[], float] = trio.current_time
    caught_up: bool = False  # has been at the head once since it connected
    behind_since: float | None = None
    waited: bool = False  # the last batch is what it waited for at the head (not a backlog)

    async def next_batch(self) -> list[StoredEvent]:
        """The next events for this subscriber (possibly none, when all were filtered out);
        waits while there is nothing new. Raises :class:`TooSlow` if it fell behind."""
        hub = self.hub
        seen = hub.changed.version
        self.waited = self.cursor >= hub.head
        if self.waited:
            self.caught_up = True
            self.behind_since = None
            if hub.stopping:
                return []
            await hub.changed.wait(seen)
        now = self.clock()
        if self.behind_since is None:
            self.behind_since = now
        elif self.caught_up and now - self.behind_since > self.max_lag_s:
            raise TooSlow(f"this connection has been behind for over {self.max_lag_s:g} s", self.cursor)
        events = hub.from_ring(self.cursor, BATCH_MAX)
        if events is None:
            if self.caught_up:
                raise TooSlow(f"this connection fell more than {hub.ring_events} events behind", self.cursor)
            events = await self._from_log()
        if events:
            self.cursor = events[-1].id
        if self.cursor >= hub.head:
            self.caught_up = True
            self.behind_since = None
        sub = self.sub
        return [e for e in events if sub.matches(topic=e.topic, device_id=e.device_id, subject=e.subject)]

    async def _from_log(self) -> list[StoredEvent]:
        rows, bounds = await self.db.read(partial(page_after, after=self.cursor, limit=CATCH_UP_PAGE))
        if self.cursor < bounds.oldest - 1:
            # Pruned while this subscriber was catching up: a gap it must not get silently.
            raise TooSlow("events it had not yet been sent were pruned from the log", self.cursor)
        # Only up to what the hub has: past it, the ring takes over (same events, made once).
        return [stored_event(r) for r in rows if r.id <= self.hub.head]

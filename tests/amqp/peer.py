"""A test double for Azure Service Bus: a small AMQP 1.0 broker on python-qpid-proton.

It stands in for Service Bus because no Service Bus emulator runs here (Microsoft's is
Docker-only, and no Debian broker answers CBS put-token). It serves the unmodified
azure-servicebus SDK just enough of the service's behaviour for the appliance's tests:

- SASL ANONYMOUS; ``$cbs`` put-token answered ``status-code: 202``. With a SAS key name
  and key configured, the token's signature, key name and expiry are checked (``401``
  otherwise), and queue links are refused on a connection that has no valid token.
- Queues, created on first use, with peek-lock receive: every transfer carries a random
  16-byte delivery tag (the SDK's lock token) and the ``x-opt-sequence-number``,
  ``x-opt-enqueued-time`` and ``x-opt-locked-until`` annotations.
- Outcomes (receiver settle mode "second": echoed, then settled): accepted completes;
  modified (abandon) puts the message back with its delivery count raised; released puts
  it back as it was; rejected dead-letters it into ``<queue>/$DeadLetterQueue`` with the
  ``DeadLetterReason`` and ``DeadLetterErrorDescription`` application properties.
- ``<queue>/$management``: ``com.microsoft:renew-lock`` and ``com.microsoft:peek-message``
  (locked messages included); anything else is answered 501.
- Batch sends: one transfer whose body holds one data section per message, split here.
- Drain: a drained receiver with nothing left gets ``link.drained()``.
- Redelivery: a message still locked when its receiver link or connection goes away goes
  back to the queue, delivery count raised. Real Service Bus waits for the lock to expire;
  doing it at once keeps the tests free of sleeps. Locks never expire on their own here.

Its WebSocket front (:mod:`tests.amqp.wsfront`) pads every performative the peer sends to
all its fields, as Service Bus sends them (:mod:`tests.amqp.frames`): proton leaves out
trailing defaults, which azure-servicebus before 7.15 cannot read.

Not modelled: settling over ``$management`` (the SDK's fallback when its receive link is
gone), sessions, deferral, scheduling, TTL, duplicate detection, topics.
"""

from __future__ import annotations

import base64
import bisect
import dataclasses
import hashlib
import hmac
import itertools
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, quote_plus, urlparse

from proton import (
    Condition,
    Data,
    Delivery,
    Endpoint,
    Handler,
    Link,
    Message,
    ProtonException,
    Sender,
    symbol,
    timestamp,
)

__all__ = ["DEAD_LETTER_SUFFIX", "Broker", "node_of", "split_transfer"]

_log = logging.getLogger(__name__)

DEAD_LETTER_SUFFIX = "/$DeadLetterQueue"
_MANAGEMENT_SUFFIX = "/$management"
_WS_PATH = "$servicebus/websocket/"
# Credit granted to the SDK's senders, topped up after every transfer.
_INCOMING_CREDIT = 100
_DATA_SECTION = 0x75  # AMQP 1.0 §3.2.6
_MESSAGE_SECTIONS = range(0x70, 0x79)  # header .. footer descriptors


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclasses.dataclass
class _Stored:
    seq: int
    message: Message
    enqueued_ms: int
    delivery_count: int = 0


@dataclasses.dataclass
class _Lock:
    queue: _Queue
    stored: _Stored
    link: Sender
    delivery: Delivery
    locked_until_ms: int


@dataclasses.dataclass
class _Queue:
    name: str
    ready: list[_Stored] = dataclasses.field(default_factory=list)  # by sequence number
    consumers: list[Sender] = dataclasses.field(default_factory=list)

    def put(self, stored: _Stored) -> None:
        bisect.insort(self.ready, stored, key=lambda s: s.seq)


class _Refused(Exception):
    def __init__(self, status: int, condition: str, description: str) -> None:
        super().__init__(description)
        self.status, self.condition, self.description = status, condition, description


def node_of(address: str | None) -> str:
    """``amqps://host[:port]/[$servicebus/websocket/]queue`` (or a bare node) -> the node name."""
    if not address:
        return ""
    path = urlparse(address).path.lstrip("/") if "://" in address else address
    return path.removeprefix(_WS_PATH)


def split_transfer(raw: bytes) -> list[Message]:
    """One transfer's payload -> its messages (a batch holds one encoded message per data section).

    The transfer's message format (0x80013700 for a batch) is not exposed by proton's Python
    API, so a batch is recognised by its data sections all holding encoded AMQP messages.
    """
    datas: list[bytes] = []
    rest = raw
    while rest:
        data = Data()
        used = data.decode(rest)
        rest = rest[used:]
        data.rewind()
        if data.next() == Data.DESCRIBED:
            data.enter()
            data.next()
            descriptor = data.get_object()
            data.next()
            if descriptor == _DATA_SECTION:
                datas.append(bytes(data.get_binary()))  # a copy: the Data's memory is freed
            data.exit()
    if datas and all(len(d) > 2 and d[:2] == b"\x00\x53" and d[2] in _MESSAGE_SECTIONS for d in datas):
        messages = []
        for item in datas:
            msg = Message()
            msg.decode(item)
            messages.append(msg)
        return messages
    msg = Message()
    msg.decode(raw)
    return [msg]


def _elements(value: Any) -> list[Any]:
    """An AMQP array (proton ``Array``) or list as a Python list."""
    return list(getattr(value, "elements", value) or [])


def _token_bytes(value: Any) -> bytes:
    """A lock token as the SDK sends it (uuid) -> the delivery tag it came from."""
    return value.bytes_le if isinstance(value, uuid.UUID) else uuid.UUID(str(value)).bytes_le


class Broker(Handler):
    """The proton handler holding every queue; run it with ``Container(broker).run()``.

    All state is touched from the container's thread only.
    """

    def __init__(
        self, *, sas_key_name: str = "", sas_key: str = "", lock_duration_s: float = 30.0
    ) -> None:
        super().__init__()
        self._sas = (sas_key_name, sas_key) if sas_key else None
        self._lock_ms = int(lock_duration_s * 1000)
        self._queues: dict[str, _Queue] = {}
        self._locks: dict[bytes, _Lock] = {}
        self._seq = itertools.count(1)
        self._authorized: set[Any] = set()  # connections that presented a valid token
        self._replies: dict[tuple[Any, str], Sender] = {}  # (connection, address) -> our sender

    def queue(self, name: str) -> _Queue:
        if name not in self._queues:
            self._queues[name] = _Queue(name)
        return self._queues[name]

    # --- endpoints ----------------------------------------------------------------

    def on_connection_remote_open(self, event: Any) -> None:
        event.connection.open()

    def on_session_remote_open(self, event: Any) -> None:
        event.session.open()

    def on_link_remote_open(self, event: Any) -> None:
        link = event.link
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        link.snd_settle_mode = link.remote_snd_settle_mode
        link.rcv_settle_mode = link.remote_rcv_settle_mode
        node = node_of(link.remote_source.address if link.is_sender else link.remote_target.address)
        is_service_node = node == "$cbs" or node.endswith(_MANAGEMENT_SUFFIX)
        if node != "$cbs" and self._sas and link.connection not in self._authorized:
            link.open()
            link.condition = Condition("amqp:unauthorized-access", f"no valid token for {node}")
            link.close()
            return
        link.open()
        if link.is_receiver:
            link.flow(_INCOMING_CREDIT)
        elif is_service_node:
            self._replies[(link.connection, node)] = link
            self._replies[(link.connection, link.remote_target.address or "")] = link
        else:
            queue = self.queue(node)
            queue.consumers.append(link)
            self._pump(queue)

    def on_link_flow(self, event: Any) -> None:
        link = event.link
        if link.is_sender:
            queue = self._queues.get(node_of(link.remote_source.address))
            if queue is not None and link in queue.consumers:
                self._pump(queue)

    def on_link_remote_close(self, event: Any) -> None:
        self._forget(lambda link: link == event.link)
        event.link.close()

    def on_session_remote_close(self, event: Any) -> None:
        self._forget(lambda link: link.session == event.session)
        event.session.close()

    def on_connection_remote_close(self, event: Any) -> None:
        self._drop_connection(event.connection)
        event.connection.close()

    def on_transport_closed(self, event: Any) -> None:
        if event.connection is not None:
            self._drop_connection(event.connection)

    def _drop_connection(self, connection: Any) -> None:
        self._forget(lambda link: link.connection == connection)
        self._authorized.discard(connection)

    def _forget(self, gone: Callable[[Link], bool]) -> None:
        """Drop the links ``gone(link)`` selects; their locked messages go back to their queue."""
        self._replies = {k: v for k, v in self._replies.items() if not gone(v)}
        touched = set()
        for token, lock in list(self._locks.items()):
            if gone(lock.link):
                del self._locks[token]
                lock.stored.delivery_count += 1
                lock.queue.put(lock.stored)
                touched.add(lock.queue.name)
        for queue in self._queues.values():
            queue.consumers = [link for link in queue.consumers if not gone(link)]
            if queue.name in touched:
                self._pump(queue)

    # --- deliveries -------------------------------------------------------------------

    def _pump(self, queue: _Queue) -> None:
        """Hand ready messages to consumers with credit; answer a drain when none are left."""
        active = Endpoint.LOCAL_ACTIVE | Endpoint.REMOTE_ACTIVE
        for link in queue.consumers:
            if link.state & active != active:
                continue
            while link.credit > 0 and queue.ready:
                self._send(queue, queue.ready.pop(0), link)
            if link.drain_mode and link.credit > 0:
                link.drained()

    def _send(self, queue: _Queue, stored: _Stored, link: Sender) -> None:
        tag = os.urandom(16)
        locked_until = _now_ms() + self._lock_ms
        msg = stored.message
        msg.annotations = {
            **(msg.annotations or {}),
            symbol("x-opt-sequence-number"): stored.seq,
            symbol("x-opt-enqueued-time"): timestamp(stored.enqueued_ms),
            symbol("x-opt-locked-until"): timestamp(locked_until),
        }
        msg.delivery_count = stored.delivery_count
        delivery = link.delivery(tag)  # type: ignore[arg-type]  # bytes work: proton's py2bytes
        delivery.lock_token = tag  # kept on the delivery: proton's Delivery.tag decodes as UTF-8
        link.send(msg.encode())
        link.advance()
        self._locks[tag] = _Lock(queue, stored, link, delivery, locked_until)

    def on_delivery(self, event: Any) -> None:
        delivery, link = event.delivery, event.link
        if link.is_receiver:
            if delivery.readable and not delivery.partial:
                raw = link.recv(delivery.pending)
                link.advance()
                try:
                    self._on_incoming(link, raw)
                    delivery.update(Delivery.ACCEPTED)
                except (ProtonException, ValueError, KeyError, TypeError) as exc:
                    # A test double must not die on what a client sends: refuse it and say why.
                    _log.exception("refusing a transfer on %s", node_of(link.remote_target.address))
                    delivery.local.condition = Condition("amqp:decode-error", str(exc))
                    delivery.update(Delivery.REJECTED)
                delivery.settle()
                link.flow(1)
        elif delivery.updated:
            self._on_outcome(delivery)

    def _on_outcome(self, delivery: Delivery) -> None:
        state = delivery.remote_state
        if state not in (Delivery.ACCEPTED, Delivery.REJECTED, Delivery.RELEASED, Delivery.MODIFIED):
            return
        lock = self._locks.pop(getattr(delivery, "lock_token", b""), None)
        if lock is not None:
            if state == Delivery.REJECTED:
                condition = delivery.remote.condition
                info: Any = (condition.info if condition else None) or {}
                info = {str(k): v for k, v in info.items()}
                self._dead_letter(lock, info.get("DeadLetterReason"), info.get("DeadLetterErrorDescription"))
            elif state == Delivery.MODIFIED:
                lock.stored.delivery_count += 1 if delivery.remote.failed else 0
                lock.queue.put(lock.stored)
            elif state == Delivery.RELEASED:
                lock.queue.put(lock.stored)
        # Echo the outcome with no error attached (the SDK raises on a rejected+error echo).
        delivery.update(state)
        delivery.settle()
        if lock is not None:
            self._pump(lock.queue)

    def _dead_letter(self, lock: _Lock, reason: object, description: object) -> None:
        msg = lock.stored.message
        properties: Any = {
            **(msg.properties or {}),
            "DeadLetterReason": str(reason or ""),
            "DeadLetterErrorDescription": str(description or ""),
        }
        msg.properties = properties
        dlq = self.queue(lock.queue.name + DEAD_LETTER_SUFFIX)
        dlq.put(_Stored(next(self._seq), msg, _now_ms(), lock.stored.delivery_count))
        self._pump(dlq)

    # --- what the SDK sends -----------------------------------------------------------

    def _on_incoming(self, link: Link, raw: bytes) -> None:
        node = node_of(link.remote_target.address)
        if node == "$cbs":
            request = Message()
            request.decode(raw)
            self._cbs(link, request)
        elif node.endswith(_MANAGEMENT_SUFFIX):
            request = Message()
            request.decode(raw)
            self._management(link, node.removesuffix(_MANAGEMENT_SUFFIX), request)
        else:
            queue = self.queue(node)
            for msg in split_transfer(raw):
                queue.put(_Stored(next(self._seq), msg, _now_ms()))
            self._pump(queue)

    def _cbs(self, link: Link, request: Message) -> None:
        props: dict[str, Any] = request.properties or {}
        status, description = 202, "Accepted"
        if props.get("operation") != "put-token":
            status, description = 400, f"unknown operation {props.get('operation')!r}"
        elif self._sas is not None and not self._token_ok(str(request.body)):
            status, description = 401, "InvalidSignature: the token is not valid"
        if status == 202:
            self._authorized.add(link.connection)
        self._reply(link, "$cbs", request, {"status-code": status, "status-description": description}, None)

    def _token_ok(self, token: str) -> bool:
        assert self._sas is not None
        fields = {k: v[0] for k, v in parse_qs(token.removeprefix("SharedAccessSignature ")).items()}
        try:
            sr, sig, se, skn = fields["sr"], fields["sig"], fields["se"], fields["skn"]
        except KeyError:
            return False
        key_name, key = self._sas
        signed = f"{quote_plus(sr)}\n{se}".encode()
        expected = base64.b64encode(hmac.new(key.encode(), signed, hashlib.sha256).digest()).decode()
        return skn == key_name and hmac.compare_digest(sig, expected) and int(se) > time.time()

    def _management(self, link: Link, entity: str, request: Message) -> None:
        props: dict[str, Any] = request.properties or {}
        operation = props.get("operation")
        body: dict[str, Any] = request.body if isinstance(request.body, dict) else {}
        try:
            if operation == "com.microsoft:renew-lock":
                result = self._renew(body)
            elif operation == "com.microsoft:peek-message":
                result = self._peek(self.queue(entity), body)
            else:
                raise _Refused(501, "amqp:not-implemented", f"operation {operation!r} is not modelled")
        except _Refused as exc:
            props = {"statusCode": exc.status, "statusDescription": exc.description,
                     "errorCondition": symbol(exc.condition)}
            self._reply(link, entity + _MANAGEMENT_SUFFIX, request, props, None)
            return
        status = 204 if result == {"messages": []} else 200
        props = {"statusCode": status, "statusDescription": "OK"}
        self._reply(link, entity + _MANAGEMENT_SUFFIX, request, props, result)

    def _renew(self, body: dict[str, Any]) -> dict[str, Any]:
        tokens = [_token_bytes(t) for t in _elements(body.get("lock-tokens"))]
        if any(t not in self._locks for t in tokens):
            raise _Refused(410, "com.microsoft:message-lock-lost", "the lock was lost or never held")
        expirations = []
        for lock in (self._locks[t] for t in tokens):
            lock.locked_until_ms = _now_ms() + self._lock_ms
            expirations.append(timestamp(lock.locked_until_ms))
        return {"expirations": expirations}

    def _peek(self, queue: _Queue, body: dict[str, Any]) -> dict[str, Any]:
        start = int(body.get("from-sequence-number") or 0)
        count = int(body.get("message-count") or 1)
        held = [lock.stored for lock in self._locks.values() if lock.queue is queue]
        found = sorted([s for s in queue.ready + held if s.seq >= start], key=lambda s: s.seq)[:count]
        out = []
        for stored in found:
            msg = stored.message
            msg.annotations = {**(msg.annotations or {}), symbol("x-opt-sequence-number"): stored.seq,
                               symbol("x-opt-enqueued-time"): timestamp(stored.enqueued_ms)}
            msg.delivery_count = stored.delivery_count
            out.append({"message": msg.encode()})
        return {"messages": out}

    def _reply(self, link: Link, node: str, request: Message, props: dict[str, Any], body: Any) -> None:
        sender = self._replies.get((link.connection, request.reply_to or "")) or self._replies.get(
            (link.connection, node)
        )
        if sender is None:
            _log.warning("no reply link for %s on this connection; dropping the answer", node)
            return
        response = Message(body=body, correlation_id=request.id, properties=props)
        delivery: Any = sender.send(response)
        if sender.snd_settle_mode == Link.SND_SETTLED:
            delivery.settle()

"""The appliance's link to one Azure Service Bus queue (online orders; the support channel).

Service Bus is reached only by AMQP over WebSockets (``wss://<namespace>:443/$servicebus/
websocket``), optionally through the box's HTTP proxy, with TLS always verified. The link
receives in peek-lock: a message stays locked (invisible to others) until it is completed,
abandoned or dead-lettered; one still locked when the link closes comes back later with its
delivery count raised, so the consumer must be idempotent on ``message_id`` (docs/architecture.md §5).

Two layers:

- :class:`QueueLink` is the narrow, blocking interface; :class:`ServiceBusQueueLink`
  implements it over the azure-servicebus **sync** client (its asyncio client does not run
  under trio). Tests and the orders service's own tests can supply any other ``QueueLink``.
- :class:`AsyncQueueLink` drives a ``QueueLink`` from trio. Every call runs, in order, on
  one dedicated worker thread, so all SDK calls happen on the same thread and the same
  client, never two at once (the SDK's receivers are not thread-safe).

Cancellation: a trio task cancelled while its call is in the worker thread waits for that
call to return (like ``trio.to_thread.run_sync`` with ``abandon_on_cancel=False``: abandoning
the thread raced the later ``close()``), then sees ``Cancelled``; the call's result is dropped.
That wait is bounded: one ``receive`` attempt, connecting included, lasts at most
``max_wait_s`` (measured: a cancel 2.0 s after the call with ``max_wait_s=2``), and the SDK
makes ``retry_total + 1`` attempts with back-off in between; settling waits for the
service's answer (about 2 ms here; the SDK gives up after 60 s). Messages a cancelled
``receive`` took stay locked on the link and come back once the link is closed. The worker
thread is not a daemon: at interpreter exit Python waits for its current call.

Who closes what: the owner of a ``ServiceBusQueueLink`` calls ``close()`` (or ``aclose()``
on the async side), which releases buffered messages, detaches and closes the connection.

Exceptions (anything else escaping is a bug)::

    QueueLinkError             the call failed; back off, then retry or reopen the link
    ├── LinkConfigError   the options cannot work (bad proxy URL, missing key): fix the config
    ├── LinkAuthError     the namespace refused the key or the queue: retrying will not help
    └── LockLostError     the message's lock is gone: it was not settled and will come back
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from types import MappingProxyType
from typing import Any, Final, Protocol, TypeVar

import attrs
import trio
from azure.core.credentials import AzureNamedKeyCredential
from azure.servicebus import (
    ServiceBusClient,
    ServiceBusReceivedMessage,
    ServiceBusReceiveMode,
    ServiceBusReceiver,
    TransportType,
)
from azure.servicebus.amqp import AmqpMessageBodyType
from azure.servicebus.exceptions import (
    MessageAlreadySettled,
    MessageLockLostError,
    ServiceBusAuthenticationError,
    ServiceBusAuthorizationError,
    ServiceBusError,
)

from appliance.config import ServiceBusConfig, WanConfig
from appliance.services.wan import WanConfigError, bypasses_proxy, parse_proxy, ssl_context

__all__ = [
    "AsyncQueueLink",
    "LinkAuthError",
    "LinkConfigError",
    "LinkOptions",
    "LockLostError",
    "QueueLink",
    "QueueLinkError",
    "ReceivedMessage",
    "ServiceBusQueueLink",
    "open_queue_link",
    "proxy_settings",
]

T = TypeVar("T")

# The most messages one receive() asks for: every one of them is held locked until settled.
MAX_RECEIVE_BATCH: Final = 100
# Dead-letter reason and description travel as application properties of the dead-lettered
# message; the consumer's reasons are one line, and this keeps a parser error that quotes
# the payload from bloating the message past the service's header limits.
MAX_DEAD_LETTER_TEXT: Final = 1024
_REFUSED_STATUS: Final = (401, 403)  # CBS put-token: unauthorized, forbidden


# --- errors -------------------------------------------------------------------------


class QueueLinkError(Exception):
    """A Service Bus call failed; the link can be retried or reopened."""


class LinkConfigError(QueueLinkError):
    """The link's options cannot work; retrying will not help."""


class LinkAuthError(QueueLinkError):
    """The namespace refused the SAS key (or its rights on the queue)."""


class LockLostError(QueueLinkError):
    """The message was not settled: its lock is gone and it will be delivered again."""


def _refused_token(exc: Exception) -> bool:
    # With ``custom_endpoint_address`` set, the SDK reports a refused put-token as a
    # ServiceBusConnectionError ("for uamqp parity"); the CBS answer's status code stays on
    # the inner exception (pyamqp's TokenAuthFailure).
    status = getattr(getattr(exc, "inner_exception", None), "status_code", None)
    return status in _REFUSED_STATUS


def _translate(action: str, exc: Exception) -> QueueLinkError:
    if isinstance(exc, ServiceBusAuthenticationError | ServiceBusAuthorizationError) or _refused_token(exc):
        return LinkAuthError(f"{action}: the namespace refused the credentials: {exc}")
    if isinstance(exc, MessageLockLostError):
        return LockLostError(f"{action}: the message's lock was lost; it will be redelivered")
    if isinstance(exc, MessageAlreadySettled):
        return QueueLinkError(f"{action}: the message was already settled")
    return QueueLinkError(f"{action} failed: {type(exc).__name__}: {exc}")


# --- values and options ---------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ReceivedMessage:
    """One message received in peek-lock, as the consumer sees it.

    ``body`` is the data section's bytes (an AMQP value body that is text or bytes is given
    as bytes too; any other body is empty, and ``body_type`` says what it was).
    ``properties`` are the application properties with keys and values as ``str``: bytes
    are decoded as UTF-8 (invalid bytes replaced), other values go through ``str()``.
    ``handle`` is opaque: pass the message back to the link that received it to settle it.
    """

    message_id: str
    body: bytes
    properties: Mapping[str, str]
    delivery_count: int
    sequence_number: int
    body_type: str = "data"
    handle: object = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen(kw_only=True)
class LinkOptions:
    """Everything :class:`ServiceBusQueueLink` needs; :meth:`from_config` builds it."""

    namespace: str  # host name only, e.g. "e-serversync-ns.servicebus.windows.net"
    queue: str
    sas_key_name: str
    sas_key: str = attrs.field(repr=False)
    # "host:port" the TLS connection really goes to (tests); the AMQP host name and the
    # token audience stay the namespace's.
    endpoint: str = ""
    # Extra CA bundle (PEM), added to the system's. Verification is never off.
    ca_file: str = ""
    proxy: str = ""  # "http://[user:pass@]host:port"; empty = direct
    max_wait_s: float = 5.0
    try_timeout_s: float = 10.0  # bounds one attempt at connecting or a management call
    retry_total: int = 2
    retry_backoff_factor_s: float = 0.8
    retry_backoff_max_s: float = 10.0
    # How long the SDK blocks on its socket per poll (None: its default, 1 s over
    # websockets). Closing a receiver drains for two idle polls; tests shorten it.
    socket_timeout_s: float | None = None

    def ssl_context(self) -> ssl.SSLContext:
        """The WAN TLS policy (``appliance.services.wan``): the system's roots plus
        ``ca_file``, TLS 1.2 at least. (The SDK's ``connection_verify`` would *replace* its
        bundle instead, which breaks a proxy that inspects only some hosts.)"""
        try:
            return ssl_context(self.ca_file)
        except WanConfigError as exc:
            raise LinkConfigError(str(exc)) from exc

    @classmethod
    def from_config(cls, sb: ServiceBusConfig, wan: WanConfig, *, queue: str = "") -> LinkOptions:
        """The options for ``sb`` (``[orders]`` or ``[support]``); ``queue`` overrides ``sb.queue``
        (pairing gives it). The WAN proxy applies unless ``wan.no_proxy`` names the namespace
        (the one NO_PROXY rule: ``appliance.services.wan.bypasses_proxy``)."""
        proxy = "" if bypasses_proxy(sb.namespace, wan.no_proxy) else wan.proxy
        return cls(
            namespace=sb.namespace,
            queue=queue or sb.queue,
            sas_key_name=sb.sas_key_name,
            sas_key=sb.sas_key,
            endpoint=sb.testing.endpoint,
            ca_file=sb.ca_file,
            proxy=proxy,
            max_wait_s=sb.max_wait_s,
        )


def proxy_settings(url: str) -> dict[str, Any] | None:
    """``http://[user:pass@]host:port`` -> the SDK's ``http_proxy`` dict (None for "")."""
    try:
        settings = parse_proxy(url)
    except WanConfigError as exc:
        raise LinkConfigError(str(exc)) from exc
    if settings is None:
        return None
    if settings.scheme != "http":
        # The SDK (websocket-client underneath) speaks plain HTTP CONNECT to its proxy.
        raise LinkConfigError(f"Service Bus supports only http:// proxies, got {settings.scheme}://")
    out: dict[str, Any] = {"proxy_hostname": settings.host, "proxy_port": settings.port}
    if settings.username:
        out["username"], out["password"] = settings.username, settings.password
    return out


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _to_value(msg: ServiceBusReceivedMessage) -> ReceivedMessage:
    body_type = msg.body_type
    if body_type == AmqpMessageBodyType.DATA:
        body = b"".join(msg.body)
    elif body_type == AmqpMessageBodyType.VALUE and isinstance(msg.body, bytes | str):
        body = msg.body if isinstance(msg.body, bytes) else msg.body.encode()
    else:
        body = b""
    props = {_text(k): _text(v) for k, v in (msg.application_properties or {}).items()}
    return ReceivedMessage(
        message_id="" if msg.message_id is None else _text(msg.message_id),
        body=body,
        properties=MappingProxyType(props),
        delivery_count=msg.delivery_count or 0,
        sequence_number=msg.sequence_number or 0,
        body_type=str(body_type.value),
        handle=msg,
    )


# --- the blocking link -------------------------------------------------------------------


class QueueLink(Protocol):
    """One queue in peek-lock. Blocking: call from one worker thread (see AsyncQueueLink)."""

    def receive(self, max_messages: int) -> list[ReceivedMessage]:
        """Up to ``max_messages`` messages, waiting at most the link's max wait; maybe none."""
        ...

    def complete(self, msg: ReceivedMessage) -> None:
        """Done with it: the service deletes it."""
        ...

    def dead_letter(self, msg: ReceivedMessage, reason: str, description: str) -> None:
        """Never deliver it again: move it to the queue's dead-letter queue with a reason."""
        ...

    def abandon(self, msg: ReceivedMessage) -> None:
        """Give it back now: it will be delivered again, delivery count raised."""
        ...

    def close(self) -> None:
        """Release what is buffered, detach, close the connection. Idempotent."""
        ...


class ServiceBusQueueLink:
    """:class:`QueueLink` over the azure-servicebus sync client, AMQP over WebSockets only.

    Creating it opens nothing; the first ``receive`` connects. Not thread-safe: one caller
    at a time (:class:`AsyncQueueLink` sees to it).
    """

    def __init__(self, options: LinkOptions) -> None:
        if not options.namespace or "/" in options.namespace or ":" in options.namespace:
            raise LinkConfigError(f"namespace must be a host name, got {options.namespace!r}")
        if not options.queue:
            raise LinkConfigError("no queue name (it comes from pairing or [orders].queue)")
        if not options.sas_key_name or not options.sas_key:
            raise LinkConfigError("a SAS key name and key are needed")
        self._options = options
        self._client = ServiceBusClient(
            fully_qualified_namespace=options.namespace,
            credential=AzureNamedKeyCredential(options.sas_key_name, options.sas_key),
            transport_type=TransportType.AmqpOverWebsocket,  # 443 only: never AMQP on 5671
            custom_endpoint_address=f"sb://{options.endpoint}" if options.endpoint else None,
            ssl_context=options.ssl_context(),
            http_proxy=proxy_settings(options.proxy),  # the SDK ignores HTTPS_PROXY
            retry_total=options.retry_total,
            retry_backoff_factor=options.retry_backoff_factor_s,
            retry_backoff_max=options.retry_backoff_max_s,
            retry_mode="exponential",
            try_timeout=options.try_timeout_s,
        )
        self._receiver: ServiceBusReceiver = self._client.get_queue_receiver(
            options.queue,
            receive_mode=ServiceBusReceiveMode.PEEK_LOCK,
            max_wait_time=options.max_wait_s,
            prefetch_count=0,  # nothing locked ahead of need
            socket_timeout=options.socket_timeout_s,
        )
        self._closed = False

    def receive(self, max_messages: int) -> list[ReceivedMessage]:
        if not 1 <= max_messages <= MAX_RECEIVE_BATCH:
            raise ValueError(f"max_messages must be 1..{MAX_RECEIVE_BATCH}, got {max_messages}")
        self._check_open()
        try:
            got = self._receiver.receive_messages(
                max_message_count=max_messages, max_wait_time=self._options.max_wait_s
            )
        except (ServiceBusError, OSError, ValueError) as exc:
            raise _translate("receive", exc) from exc
        return [_to_value(m) for m in got]

    def complete(self, msg: ReceivedMessage) -> None:
        self._settle("complete", msg, self._receiver.complete_message)

    def dead_letter(self, msg: ReceivedMessage, reason: str, description: str) -> None:
        self._settle(
            "dead-letter",
            msg,
            lambda m: self._receiver.dead_letter_message(
                m, reason=reason[:MAX_DEAD_LETTER_TEXT], error_description=description[:MAX_DEAD_LETTER_TEXT]
            ),
        )

    def abandon(self, msg: ReceivedMessage) -> None:
        self._settle("abandon", msg, self._receiver.abandon_message)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._receiver.close()
        finally:
            self._client.close()

    def _check_open(self) -> None:
        if self._closed:
            raise QueueLinkError("the link is closed")

    def _settle(
        self, action: str, msg: ReceivedMessage, call: Callable[[ServiceBusReceivedMessage], None]
    ) -> None:
        self._check_open()
        handle = msg.handle
        if not isinstance(handle, ServiceBusReceivedMessage):
            raise TypeError(f"{action}: the message was not received by a ServiceBusQueueLink")
        try:
            call(handle)
        except (ServiceBusError, MessageAlreadySettled, OSError, ValueError) as exc:
            raise _translate(action, exc) from exc


def open_queue_link(options: LinkOptions) -> AsyncQueueLink:
    """A trio-side link to ``options.queue``; the caller closes it with ``aclose()``."""
    return AsyncQueueLink(ServiceBusQueueLink(options))


# --- the trio side ----------------------------------------------------------------------


class AsyncQueueLink:
    """Drives a :class:`QueueLink` from trio on one dedicated worker thread.

    Calls run one at a time in the order they were made, all on the same thread. On
    cancellation, the caller waits for the running call to return and then sees
    ``Cancelled`` (see the module docstring for how long that can be).
    """

    def __init__(self, link: QueueLink) -> None:
        self._link = link
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="servicebus")
        self._closed = False

    async def receive(self, max_messages: int) -> list[ReceivedMessage]:
        return await self._run(self._link.receive, max_messages)

    async def complete(self, msg: ReceivedMessage) -> None:
        await self._run(self._link.complete, msg)

    async def dead_letter(self, msg: ReceivedMessage, reason: str, description: str) -> None:
        await self._run(self._link.dead_letter, msg, reason, description)

    async def abandon(self, msg: ReceivedMessage) -> None:
        await self._run(self._link.abandon, msg)

    async def aclose(self) -> None:
        """Close the link on its thread, then let the thread go. Wrap it in a shielded,
        bounded scope during shutdown (closing drains the link: about 2 s measured)."""
        if self._closed:
            return
        try:
            await self._run(self._link.close)
        finally:
            self._closed = True
            self._worker.shutdown(wait=False)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise QueueLinkError("the link is closed")
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        future: Future[T] = self._worker.submit(fn, *args)
        future.add_done_callback(lambda _f: token.run_sync_soon(done.set))
        # Never abandon the thread: the SDK call would race the next one (and close()).
        with trio.CancelScope(shield=True):
            await done.wait()
        await trio.lowlevel.checkpoint_if_cancelled()
        return future.result()

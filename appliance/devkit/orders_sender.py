"""Put online orders on a Service Bus queue, as the platform does: the demo's and the
benchmark's ``send_order`` for ``run_cloud_simulator(send_order=...)``.

It uses the real azure-servicebus SDK (a runtime dependency), AMQP over WebSockets on
443 with TLS verified, to whatever namespace and endpoint the options name (the test
AMQP peer on loopback in the demo). Each message carries ``message_id`` = the order id
and ``content_type`` = ``application/json`` (docs/orders.md).

The sync SDK runs on one worker thread (see ``appliance.services.servicebus``); the
sender connects on the first order and is closed by :meth:`OrderSender.aclose`.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import trio
from azure.core.credentials import AzureNamedKeyCredential
from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusSender, TransportType

from appliance.devkit.cloud_orders import OrderMessage
from appliance.services.servicebus import LinkOptions, proxy_settings
from appliance.services.wan import ssl_context

__all__ = ["OrderSender"]


class OrderSender:
    """``await sender(order)`` sends one order; ``await sender.send_many(orders)`` a batch."""

    def __init__(self, options: LinkOptions) -> None:
        self._options = options
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="order-sender")
        self._client: ServiceBusClient | None = None
        self._sender: ServiceBusSender | None = None

    def _open(self) -> ServiceBusSender:
        if self._sender is None:
            o = self._options
            self._client = ServiceBusClient(
                fully_qualified_namespace=o.namespace,
                credential=AzureNamedKeyCredential(o.sas_key_name, o.sas_key),
                transport_type=TransportType.AmqpOverWebsocket,
                custom_endpoint_address=f"sb://{o.endpoint}" if o.endpoint else None,
                ssl_context=ssl_context(o.ca_file),
                http_proxy=proxy_settings(o.proxy),
                retry_total=o.retry_total,
            )
            self._sender = self._client.get_queue_sender(o.queue, socket_timeout=o.socket_timeout_s)
        return self._sender

    @staticmethod
    def message(order: OrderMessage) -> ServiceBusMessage:
        return ServiceBusMessage(json.dumps(order.body, separators=(",", ":")).encode(), message_id=order.order_id,
                                 content_type="application/json")

    def _send(self, messages: list[ServiceBusMessage]) -> None:
        self._open().send_messages(messages if len(messages) > 1 else messages[0])

    async def _run(self, messages: list[ServiceBusMessage]) -> None:
        loop_token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        future = self._worker.submit(self._send, messages)
        future.add_done_callback(lambda _f: loop_token.run_sync_soon(done.set))
        with trio.CancelScope(shield=True):  # never abandon an SDK call on its thread
            await done.wait()
        future.result()

    async def __call__(self, order: OrderMessage) -> None:
        await self._run([self.message(order)])

    async def send_many(self, orders: list[OrderMessage]) -> None:
        await self._run([self.message(o) for o in orders])

    def _close(self) -> None:
        try:
            if self._sender is not None:
                self._sender.close()
        finally:
            if self._client is not None:
                self._client.close()

    async def aclose(self) -> None:
        future = self._worker.submit(self._close)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(future.result)
        self._worker.shutdown(wait=False)

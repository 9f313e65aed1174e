"""pytest fixtures for the Service Bus test double (:mod:`tests.amqp`).

``amqp_server`` runs ``python -m tests.amqp.server`` once per session (about 0.5 s to start)
and yields an :class:`AmqpServer`: where the front listens, the CA to trust, the namespace
and SAS key to use, and helpers to build the SDK's own sync client for test-side sending
and peeking. Tests isolate themselves by queue name (``queue_name``), not by server.

A test module picks them up with ``amqp_server = fixtures.amqp_server`` (and so on), or
the root conftest lists ``"tests.amqp.fixtures"`` in ``pytest_plugins`` for every module.

Without python-qpid-proton (a machine with no C compiler to build it) this module still
imports, and exactly the tests that use the peer skip, with :data:`PEER_MISSING` as reason.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import selectors
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus, urlencode

import pytest
from azure.core.credentials import AzureNamedKeyCredential
from azure.servicebus import (
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusReceivedMessage,
    ServiceBusReceiver,
    ServiceBusSubQueue,
    TransportType,
)

try:
    from proton import Message, int32
    from proton.utils import BlockingConnection

    from tests.amqp.peer import DEAD_LETTER_SUFFIX

    PEER_MISSING = ""
except ImportError as _exc:  # no wheel for this Python; building it needs a C compiler and libssl-dev
    PEER_MISSING = (f"the AMQP test peer needs python-qpid-proton, which is not installed ({_exc}); "
                    "scripts/setup --test builds it where a C compiler and libssl-dev are installed")

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
NAMESPACE = "localhost"  # resolves to 127.0.0.1 here: whatever goes wrong stays on loopback
SAS_KEY_NAME = "appliance"
# The sync SDK polls its socket, and closing a receiver drains it for two idle polls: the
# default poll over websockets (1 s) costs every test seconds for nothing.
SOCKET_TIMEOUT_S = 0.25
WIRE_TIMEOUT_S = 5.0
MAX_PEEK = 50


class ServerFailed(Exception):
    """The server subprocess did not come up; ``stderr`` holds what it said."""

    def __init__(self, message: str, stderr: str) -> None:
        super().__init__(f"{message}\n--- server stderr ---\n{stderr}")
        self.stderr = stderr


@dataclass(frozen=True)
class AmqpServer:
    host: str
    port: int
    ca_file: str
    amqp_port: int
    namespace: str
    sas_key_name: str
    sas_key: str
    process: subprocess.Popen[bytes]

    @property
    def endpoint(self) -> str:
        """"host:port" for ``custom_endpoint_address`` / ``ServiceBusConfig.endpoint``."""
        return f"{self.host}:{self.port}"

    def client(self, **overrides: Any) -> ServiceBusClient:
        """The SDK's sync client, production transport, pointed at this server."""
        kwargs: dict[str, Any] = {
            "fully_qualified_namespace": self.namespace,
            "credential": AzureNamedKeyCredential(self.sas_key_name, self.sas_key),
            "transport_type": TransportType.AmqpOverWebsocket,
            "custom_endpoint_address": f"sb://{self.endpoint}",
            "connection_verify": self.ca_file,
            "retry_total": 0,
        }
        kwargs.update(overrides)
        return ServiceBusClient(**kwargs)

    @contextlib.contextmanager
    def receiver(
        self, queue: str, *, dead_letter: bool = False, **kwargs: Any
    ) -> Iterator[ServiceBusReceiver]:
        """An SDK peek-lock receiver on its own connection (the SDK opens one per handler)."""
        sub = ServiceBusSubQueue.DEAD_LETTER if dead_letter else None
        with self.client() as client, client.get_queue_receiver(
            queue, sub_queue=sub, socket_timeout=SOCKET_TIMEOUT_S, **kwargs
        ) as receiver:
            yield receiver

    def send(self, queue: str, *messages: ServiceBusMessage) -> None:
        """Send with the SDK (several messages go as one batch transfer)."""
        with self.client() as client, client.get_queue_sender(queue, socket_timeout=SOCKET_TIMEOUT_S) as s:
            s.send_messages(list(messages) if len(messages) > 1 else messages[0])

    def peek(self, queue: str, *, dead_letter: bool = False) -> list[ServiceBusReceivedMessage]:
        """The SDK's view of a queue (or its dead-letter queue), nothing locked."""
        with self.receiver(queue, dead_letter=dead_letter) as receiver:
            return list(receiver.peek_messages(max_message_count=MAX_PEEK, sequence_number=1))

    # The SDK opens a connection per sender or receiver and closes it on whole seconds of
    # its keep-alive thread; where the SDK's side is not under test, these talk AMQP to the
    # peer directly (plain TCP on loopback, SASL ANONYMOUS, a CBS token): milliseconds.

    @contextlib.contextmanager
    def wire(self, audience_path: str = "") -> Iterator[BlockingConnection]:
        """A proton client connection to the peer, authorized with a put-token."""
        conn = BlockingConnection(f"amqp://127.0.0.1:{self.amqp_port}", timeout=WIRE_TIMEOUT_S)
        try:
            audience = f"sb://{self.namespace}/{audience_path}"
            status = put_token(conn, sas_token(audience, self.sas_key_name, self.sas_key), audience)
            assert status == 202, f"put-token answered {status}"
            yield conn
        finally:
            conn.close()

    def seed(self, queue: str, *messages: Message) -> None:
        """Put messages on a queue without the SDK."""
        with self.wire(queue) as conn:
            sender = conn.create_sender(queue)
            for msg in messages:
                sender.send(msg)

    def contents(self, queue: str, *, dead_letter: bool = False, max_count: int = MAX_PEEK) -> list[Message]:
        """Every message of a queue (or its dead-letter queue), locked or not, via peek-message
        (the first ``max_count``)."""
        entity = queue + DEAD_LETTER_SUFFIX if dead_letter else queue
        with self.wire(entity) as conn:
            replies = conn.create_receiver(f"{entity}/$management", credit=1)
            requests = conn.create_sender(f"{entity}/$management")
            request_id = uuid.uuid4().hex
            requests.send(Message(
                id=request_id, reply_to=f"{entity}/$management",
                properties={"operation": "com.microsoft:peek-message"},
                body={"from-sequence-number": 0, "message-count": int32(max_count)},
            ))
            answer = replies.receive(WIRE_TIMEOUT_S)
            replies.accept()
        props: dict[str, Any] = answer.properties or {}
        body: Any = answer.body
        assert answer.correlation_id == request_id
        assert props["statusCode"] in (200, 204), props
        out = []
        for item in body["messages"]:
            msg = Message()
            msg.decode(item["message"])
            out.append(msg)
        return out


def data_message(body: bytes, message_id: str, **properties: Any) -> Message:
    """A proton message shaped like the SDK's: the body in one data section."""
    return Message(body=body, id=message_id, properties=properties or None, inferred=True)


def sas_token(audience: str, key_name: str, key: str, ttl_s: int = 300) -> str:
    """What the SDK's generate_sas_token() builds."""
    expiry = int(time.time()) + ttl_s
    signed = f"{quote_plus(audience)}\n{expiry}".encode()
    sig = base64.b64encode(hmac.new(key.encode(), signed, hashlib.sha256).digest())
    fields = {"sr": audience, "sig": sig, "se": str(expiry), "skn": key_name}
    return "SharedAccessSignature " + urlencode(fields)


def put_token(conn: BlockingConnection, token: str, audience: str) -> int:
    """CBS put-token as the SDK does it; returns the answer's ``status-code``."""
    replies = conn.create_receiver("$cbs", credit=1)
    requests = conn.create_sender("$cbs")
    request_id = uuid.uuid4().hex
    requests.send(Message(body=token, id=request_id, reply_to="$cbs", properties={
        "operation": "put-token", "type": "servicebus.windows.net:sastoken", "name": audience}))
    answer = replies.receive(WIRE_TIMEOUT_S)
    replies.accept()
    assert answer.correlation_id == request_id
    props: dict[str, Any] = answer.properties or {}
    status: int = props["status-code"]
    return status


def _read_ready_line(proc: subprocess.Popen[bytes], deadline: float) -> dict[str, Any]:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        buf = b""
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                raise TimeoutError("the server printed nothing in time")
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise EOFError("the server exited before it was ready")
            buf += chunk
    info: dict[str, Any] = json.loads(buf.split(b"\n", 1)[0])
    return info


@contextlib.contextmanager
def run_server(
    tls_dir: Path, *, port: int = 0, sas_key: str = "", extra: tuple[str, ...] = ()
) -> Iterator[AmqpServer]:
    """Run the server subprocess; on exit SIGTERM it and check it stopped cleanly (exit 0).
    Skips the calling test when python-qpid-proton is missing."""
    require_peer()
    tls_dir.mkdir(parents=True, exist_ok=True)
    stderr_path = tls_dir / "server.stderr"
    args = [sys.executable, "-m", "tests.amqp.server", "--tls-dir", str(tls_dir), "--port", str(port)]
    if sas_key:
        args += ["--sas-key-name", SAS_KEY_NAME, "--sas-key", sas_key]
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen([*args, *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr)
    try:
        try:
            info = _read_ready_line(proc, time.monotonic() + START_TIMEOUT_S)
        except (TimeoutError, EOFError) as exc:
            proc.kill()
            proc.wait()
            raise ServerFailed(str(exc), stderr_path.read_text(errors="replace")) from exc
        yield AmqpServer(
            host="localhost",
            port=info["port"],
            ca_file=info["ca"],
            amqp_port=info["amqp_port"],
            namespace=NAMESPACE,
            sas_key_name=SAS_KEY_NAME,
            sas_key=sas_key,
            process=proc,
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError("the AMQP test server ignored SIGTERM") from None
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.returncode == 0, stderr_path.read_text(errors="replace")


def require_peer() -> None:
    """Skip the calling test (only it) when the AMQP test peer cannot run here."""
    if PEER_MISSING:
        pytest.skip(PEER_MISSING)


@pytest.fixture(scope="session")
def amqp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AmqpServer]:
    """The Service Bus test double, checking SAS tokens against a random key."""
    with run_server(tmp_path_factory.mktemp("amqp-tls"), sas_key=uuid.uuid4().hex) as server:
        yield server


@pytest.fixture
def queue_name() -> str:
    """A queue no other test uses (the peer creates queues on first use)."""
    return f"orders-{uuid.uuid4().hex[:12]}"

"""The Service Bus test double against the unmodified azure-servicebus sync SDK.

Every test talks through the SDK's production transport: AMQP over WebSockets, TLS
verified against the server's trustme CA, SAS tokens checked by the peer. These are plain
sync tests (the SDK blocks); the product-side link is tested in test_servicebus_link.py.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import ssl
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import websocket
from azure.core.credentials import AzureNamedKeyCredential
from azure.servicebus import ServiceBusMessage
from azure.servicebus.exceptions import ServiceBusConnectionError

from tests.amqp import fixtures

if fixtures.PEER_MISSING:  # every test here is about the peer itself
    pytest.skip(fixtures.PEER_MISSING, allow_module_level=True)

from proton.utils import BlockingConnection, LinkDetached

from tests.amqp.fixtures import AmqpServer, data_message, put_token, run_server, sas_token
from tests.amqp.peer import node_of

amqp_server = fixtures.amqp_server
queue_name = fixtures.queue_name

WAIT_S = 5.0  # upper bound for a receive that must find messages already queued


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def test_send_receive_complete(amqp_server: AmqpServer, queue_name: str) -> None:
    amqp_server.send(queue_name, ServiceBusMessage(b'{"order": 1}', message_id="o-1",
                                                   application_properties={"kind": "order"}))
    with amqp_server.receiver(queue_name) as receiver:
        [msg] = receiver.receive_messages(max_message_count=1, max_wait_time=WAIT_S)
        assert msg.message_id == "o-1"
        assert b"".join(msg.body) == b'{"order": 1}'
        assert msg.application_properties == {b"kind": b"order"}
        assert msg.sequence_number is not None and msg.sequence_number > 0
        assert isinstance(msg.lock_token, uuid.UUID)
        assert msg.locked_until_utc is not None and msg.locked_until_utc > _now()
        assert not msg.delivery_count
        # Still there while locked (the SDK peeks from after the last received message by default).
        assert [m.message_id for m in receiver.peek_messages(5, sequence_number=1)] == ["o-1"]
        receiver.complete_message(msg)
        assert receiver.peek_messages(5, sequence_number=1) == []


def test_batch_send_is_split_into_messages(amqp_server: AmqpServer, queue_name: str) -> None:
    amqp_server.send(queue_name, *(ServiceBusMessage(f"m{i}".encode(), message_id=f"m{i}") for i in range(3)))
    with amqp_server.receiver(queue_name) as receiver:
        got = receiver.receive_messages(max_message_count=3, max_wait_time=WAIT_S)
        got_pairs = [(m.message_id, b"".join(m.body)) for m in got]
        assert got_pairs == [("m0", b"m0"), ("m1", b"m1"), ("m2", b"m2")]
        seqs = [m.sequence_number or 0 for m in got]
        assert seqs == sorted(seqs) and len(set(seqs)) == 3
        for m in got:
            receiver.complete_message(m)


def test_abandon_redelivers_with_delivery_count_raised(amqp_server: AmqpServer, queue_name: str) -> None:
    amqp_server.seed(queue_name, data_message(b"x", "a-1"))
    with amqp_server.receiver(queue_name) as receiver:
        [first] = receiver.receive_messages(max_message_count=1, max_wait_time=WAIT_S)
        receiver.abandon_message(first)
        [again] = receiver.receive_messages(max_message_count=1, max_wait_time=WAIT_S)
        assert (again.message_id, again.delivery_count) == ("a-1", 1)
        assert again.lock_token != first.lock_token
        receiver.complete_message(again)


def test_dead_letter_moves_the_message_with_its_reason(amqp_server: AmqpServer, queue_name: str) -> None:
    amqp_server.seed(queue_name, data_message(b"not json", "d-1"))
    with amqp_server.receiver(queue_name) as receiver:
        [msg] = receiver.receive_messages(max_message_count=1, max_wait_time=WAIT_S)
        receiver.dead_letter_message(msg, reason="malformed", error_description="body is not JSON")
        assert receiver.peek_messages(5, sequence_number=1) == []
    with amqp_server.receiver(queue_name, dead_letter=True) as dlq:
        [dead] = dlq.receive_messages(max_message_count=1, max_wait_time=WAIT_S)
        assert (dead.message_id, b"".join(dead.body)) == ("d-1", b"not json")
        assert dead.dead_letter_reason == "malformed"
        assert dead.dead_letter_error_description == "body is not JSON"
        dlq.complete_message(dead)


def test_renew_lock_extends_it(amqp_server: AmqpServer, queue_name: str) -> None:
    amqp_server.seed(queue_name, data_message(b"x", "r-1"))
    with amqp_server.receiver(queue_name) as receiver:
        [msg] = receiver.receive_messages(max_message_count=1, max_wait_time=WAIT_S)
        before = msg.locked_until_utc
        assert before is not None
        renewed = receiver.renew_message_lock(msg)
        # The peer's lock lasts 30 s from the renewal, which comes after the receive.
        assert renewed >= before
        assert dt.timedelta(seconds=25) < renewed - _now() <= dt.timedelta(seconds=30)
        receiver.complete_message(msg)


def test_unsettled_message_comes_back_after_the_receiver_closes(
    amqp_server: AmqpServer, queue_name: str
) -> None:
    amqp_server.seed(queue_name, data_message(b"x", "u-1"))
    with amqp_server.receiver(queue_name) as receiver:
        [msg] = receiver.receive_messages(max_message_count=1, max_wait_time=WAIT_S)
        assert (msg.message_id, msg.delivery_count) == ("u-1", None)
    with amqp_server.receiver(queue_name) as receiver:
        [again] = receiver.receive_messages(max_message_count=1, max_wait_time=WAIT_S)
        assert (again.message_id, again.delivery_count) == ("u-1", 1)
        receiver.complete_message(again)


_HOLDING_RECEIVER = """
import json, sys
from azure.core.credentials import AzureNamedKeyCredential
from azure.servicebus import ServiceBusClient, TransportType
cfg = json.loads(sys.argv[1])
client = ServiceBusClient(cfg["namespace"], AzureNamedKeyCredential(cfg["key_name"], cfg["key"]),
                          transport_type=TransportType.AmqpOverWebsocket,
                          custom_endpoint_address="sb://" + cfg["endpoint"], connection_verify=cfg["ca"])
[msg] = client.get_queue_receiver(cfg["queue"]).receive_messages(max_message_count=1, max_wait_time=5)
print(msg.message_id, flush=True)
sys.stdin.read()  # hold the lock until killed
"""


def test_locked_message_comes_back_when_the_connection_drops(
    amqp_server: AmqpServer, queue_name: str
) -> None:
    # A receiver process that dies (SIGKILL: no detach, no close) only drops its socket.
    amqp_server.seed(queue_name, data_message(b"x", "k-1"))
    cfg = {
        "namespace": amqp_server.namespace, "key_name": amqp_server.sas_key_name, "key": amqp_server.sas_key,
        "endpoint": amqp_server.endpoint, "ca": amqp_server.ca_file, "queue": queue_name,
    }
    proc = subprocess.Popen([sys.executable, "-c", _HOLDING_RECEIVER, json.dumps(cfg)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"k-1\n"
    finally:
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
    with amqp_server.wire(queue_name) as conn:
        receiver = conn.create_receiver(queue_name, credit=1)
        again = receiver.receive(WAIT_S)  # waits for the peer to notice the drop
        receiver.accept()
    assert (again.id, again.delivery_count) == ("k-1", 1)


@pytest.mark.parametrize("key_name", [fixtures.SAS_KEY_NAME, "someone-else"])
def test_a_wrong_key_is_refused(amqp_server: AmqpServer, queue_name: str, key_name: str) -> None:
    key = "not-the-key" if key_name == fixtures.SAS_KEY_NAME else amqp_server.sas_key
    bad = AzureNamedKeyCredential(key_name, key)
    client = amqp_server.client(credential=bad)
    # With a custom endpoint the SDK reports a refused token as a connection error ("for
    # uamqp parity"); the put-token answer's 401 is kept on the inner exception.
    with client, pytest.raises(ServiceBusConnectionError) as info:
        client.get_queue_sender(queue_name).__enter__()
    assert getattr(info.value.inner_exception, "status_code", None) == 401


def test_tls_is_verified(amqp_server: AmqpServer, queue_name: str, tmp_path: Path) -> None:
    import trustme

    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    client = amqp_server.client(connection_verify=str(other_ca))
    with client, pytest.raises(ServiceBusConnectionError) as info:
        client.get_queue_sender(queue_name).__enter__()
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)


@pytest.mark.parametrize(
    ("path", "subprotocols", "status"),
    [("/other", ["AMQPWSB10"], 404), ("/$servicebus/websocket", ["chat"], 400)],
)
def test_front_serves_only_the_servicebus_websocket(
    amqp_server: AmqpServer, path: str, subprotocols: list[str], status: int
) -> None:
    url = f"wss://{amqp_server.endpoint}{path}"
    tls = ssl.create_default_context(cafile=amqp_server.ca_file)
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(url, subprotocols=subprotocols, timeout=WAIT_S, sslopt={"context": tls})
    assert info.value.status_code == status


def test_server_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    with run_server(tmp_path / "tls") as server:
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(10) == 0
        assert Path(server.ca_file).read_text().startswith("-----BEGIN CERTIFICATE-----")


def test_drain_is_answered_at_the_amqp_level(amqp_server: AmqpServer, queue_name: str) -> None:
    # The SDK drains on close but does not wait for the answer; check the wire directly.
    conn = BlockingConnection(f"amqp://127.0.0.1:{amqp_server.amqp_port}", timeout=WAIT_S)
    try:
        audience = f"sb://{amqp_server.namespace}/{queue_name}"
        token = sas_token(audience, amqp_server.sas_key_name, amqp_server.sas_key)
        assert put_token(conn, token, audience) == 202
        receiver = conn.create_receiver(queue_name, credit=0)
        receiver.link.drain(5)
        conn.wait(lambda: not receiver.link.draining(), msg="the peer never answered the drain")
        assert receiver.link.credit == 0
    finally:
        conn.close()


def test_a_refused_token_opens_no_queue(amqp_server: AmqpServer, queue_name: str) -> None:
    conn = BlockingConnection(f"amqp://127.0.0.1:{amqp_server.amqp_port}", timeout=WAIT_S)
    try:
        audience = f"sb://{amqp_server.namespace}/{queue_name}"
        assert put_token(conn, sas_token(audience, amqp_server.sas_key_name, "wrong"), audience) == 401
        with pytest.raises(LinkDetached, match="unauthorized-access"):
            conn.create_receiver(queue_name, credit=1)
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("address", "node"),
    [
        ("amqps://localhost/orders-1", "orders-1"),
        ("amqps://localhost:443/$servicebus/websocket/orders-1/$management", "orders-1/$management"),
        ("amqps://ns.servicebus.windows.net/orders-1/$DeadLetterQueue", "orders-1/$DeadLetterQueue"),
        ("$cbs", "$cbs"),
        (None, ""),
    ],
)
def test_node_names_from_addresses(address: str | None, node: str) -> None:
    assert node_of(address) == node

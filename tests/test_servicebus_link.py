"""The product's Service Bus link (appliance.services.servicebus) against the test double.

The link runs exactly as in production (AMQP over WebSockets, TLS verified, SAS key, one
worker thread driven from trio); only the namespace resolves to loopback and, except in
the proxy test, ``endpoint`` sends the TLS connection to the test server's port. The
test side sends and inspects with the SDK's own client, in a thread.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

from appliance.config import ServiceBusConfig, WanConfig
from appliance.services.servicebus import (
    AsyncQueueLink,
    LinkAuthError,
    LinkConfigError,
    LinkOptions,
    QueueLinkError,
    ReceivedMessage,
    open_queue_link,
    proxy_settings,
)
from tests.amqp import fixtures
from tests.amqp.fixtures import AmqpServer, data_message, run_server

if TYPE_CHECKING:  # only a type here: without proton, just the tests using the peer skip
    from proton import Message

amqp_server = fixtures.amqp_server
queue_name = fixtures.queue_name

MAX_WAIT_S = 2.0  # the link's max_wait_s in these tests
# Every test ends well inside this; a hang fails instead of stalling the suite.
TEST_DEADLINE_S = 30.0
PROXY_START_S = 10.0


def _options(server: AmqpServer, queue: str, **overrides: Any) -> LinkOptions:
    values: dict[str, Any] = {
        "namespace": server.namespace,
        "queue": queue,
        "sas_key_name": server.sas_key_name,
        "sas_key": server.sas_key,
        "endpoint": server.endpoint,
        "ca_file": server.ca_file,
        "max_wait_s": MAX_WAIT_S,
        "retry_total": 0,
        "socket_timeout_s": fixtures.SOCKET_TIMEOUT_S,
    }
    values.update(overrides)
    return LinkOptions(**values)


async def _send(server: AmqpServer, queue: str, *messages: Message) -> None:
    await trio.to_thread.run_sync(lambda: server.seed(queue, *messages))


async def _contents(server: AmqpServer, queue: str, *, dead_letter: bool = False) -> list[Message]:
    return await trio.to_thread.run_sync(lambda: server.contents(queue, dead_letter=dead_letter))


async def _receive_one(link: AsyncQueueLink) -> ReceivedMessage:
    [msg] = await link.receive(1)
    return msg


async def test_receive_then_complete(amqp_server: AmqpServer, queue_name: str) -> None:
    props = {"kind": "order", "store": b"s-1", "lines": 3, "paid": True, "bad": b"\xff"}
    await _send(amqp_server, queue_name, data_message(b'{"id": "o-1"}', "o-1", **props))
    link = open_queue_link(_options(amqp_server, queue_name))
    with trio.fail_after(TEST_DEADLINE_S):
        msg = await _receive_one(link)
        assert msg == ReceivedMessage(
            message_id="o-1",
            body=b'{"id": "o-1"}',
            properties={"kind": "order", "store": "s-1", "lines": "3", "paid": "True", "bad": "\ufffd"},
            delivery_count=0,
            sequence_number=msg.sequence_number,
        )
        assert msg.sequence_number > 0
        await link.complete(msg)
        await link.aclose()
        assert await _contents(amqp_server, queue_name) == []


async def test_malformed_message_is_dead_lettered_with_its_reason(
    amqp_server: AmqpServer, queue_name: str
) -> None:
    await _send(amqp_server, queue_name, data_message(b"{not json", "bad-1"))
    link = open_queue_link(_options(amqp_server, queue_name))
    with trio.fail_after(TEST_DEADLINE_S):
        msg = await _receive_one(link)
        await link.dead_letter(msg, "malformed", "body is not JSON: Expecting property name at 1")
        await link.aclose()
        assert await _contents(amqp_server, queue_name) == []
        [dead] = await _contents(amqp_server, queue_name, dead_letter=True)
    assert (dead.id, dead.body) == ("bad-1", b"{not json")
    assert dead.properties == {
        "DeadLetterReason": "malformed",
        "DeadLetterErrorDescription": "body is not JSON: Expecting property name at 1",
    }


async def test_message_not_completed_comes_back_on_a_new_link(
    amqp_server: AmqpServer, queue_name: str
) -> None:
    await _send(amqp_server, queue_name, data_message(b"{}", "again-1"))
    with trio.fail_after(TEST_DEADLINE_S):
        first = open_queue_link(_options(amqp_server, queue_name))
        msg = await _receive_one(first)
        await first.aclose()  # without settling: the lock goes with the link
        with pytest.raises(QueueLinkError, match="closed"):
            await first.complete(msg)

        second = open_queue_link(_options(amqp_server, queue_name))
        again = await _receive_one(second)
        assert (again.message_id, again.delivery_count) == ("again-1", 1)
        await second.complete(again)
        await second.aclose()


async def test_abandoned_message_comes_back_at_once(amqp_server: AmqpServer, queue_name: str) -> None:
    await _send(amqp_server, queue_name, data_message(b"{}", "ab-1"))
    link = open_queue_link(_options(amqp_server, queue_name))
    with trio.fail_after(TEST_DEADLINE_S):
        await link.abandon(await _receive_one(link))
        again = await _receive_one(link)
        assert (again.message_id, again.delivery_count) == ("ab-1", 1)
        await link.complete(again)
        await link.aclose()


async def test_a_refused_key_is_an_auth_error(amqp_server: AmqpServer, queue_name: str) -> None:
    link = open_queue_link(_options(amqp_server, queue_name, sas_key="not-the-key"))
    with trio.fail_after(TEST_DEADLINE_S):
        with pytest.raises(LinkAuthError):
            await link.receive(1)
        await link.aclose()


async def test_tls_is_verified_against_the_configured_ca(amqp_server: AmqpServer, queue_name: str) -> None:
    # Without the test CA, the system trust store alone must refuse the test certificate.
    link = open_queue_link(_options(amqp_server, queue_name, ca_file=""))
    with trio.fail_after(TEST_DEADLINE_S):
        with pytest.raises(QueueLinkError, match="CERTIFICATE_VERIFY_FAILED") as info:
            await link.receive(1)
        assert not isinstance(info.value, LinkAuthError)
        await link.aclose()


async def test_cancelled_receive_waits_for_the_call_within_max_wait(
    amqp_server: AmqpServer, queue_name: str
) -> None:
    max_wait_s = 1.0
    link = open_queue_link(_options(amqp_server, queue_name, max_wait_s=max_wait_s))
    with trio.fail_after(TEST_DEADLINE_S):
        start = trio.current_time()
        with trio.move_on_after(0.05) as scope:
            await link.receive(1)  # the queue is empty: the SDK call waits max_wait_s
        waited = trio.current_time() - start
        assert scope.cancelled_caught
        # The cancel waits for the call in the thread (max_wait, connecting included), no longer.
        assert max_wait_s * 0.9 < waited < max_wait_s + 2.0
        # The link is still sound: the next call works on the same client.
        await _send(amqp_server, queue_name, data_message(b"{}", "late-1"))
        msg = await _receive_one(link)
        assert msg.message_id == "late-1"
        await link.complete(msg)
        await link.aclose()


class _RecordingLink:
    """A QueueLink that records which thread ran each call, and in which order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.release = threading.Event()

    def receive(self, max_messages: int) -> list[ReceivedMessage]:
        self.release.wait(TEST_DEADLINE_S)  # the first call holds the worker until released
        self.calls.append((f"receive {max_messages}", threading.get_ident()))
        return []

    def complete(self, msg: ReceivedMessage) -> None:
        self.calls.append((f"complete {msg.message_id}", threading.get_ident()))

    def dead_letter(self, msg: ReceivedMessage, reason: str, description: str) -> None:
        self.calls.append((f"dead-letter {msg.message_id} {reason}", threading.get_ident()))

    def abandon(self, msg: ReceivedMessage) -> None:
        self.calls.append((f"abandon {msg.message_id}", threading.get_ident()))

    def close(self) -> None:
        self.calls.append(("close", threading.get_ident()))


async def test_calls_run_in_order_on_one_worker_thread() -> None:
    fake = _RecordingLink()
    link = AsyncQueueLink(fake)
    msg = ReceivedMessage(message_id="m", body=b"", properties={}, delivery_count=0, sequence_number=1)
    with trio.fail_after(TEST_DEADLINE_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.receive, 5)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(link.complete, msg)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(link.dead_letter, msg, "r", "d")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(link.abandon, msg)
            await trio.testing.wait_all_tasks_blocked()
            fake.release.set()
        await link.aclose()
        with pytest.raises(QueueLinkError, match="closed"):
            await link.receive(1)
    expected = ["receive 5", "complete m", "dead-letter m r", "abandon m", "close"]
    assert [name for name, _ in fake.calls] == expected
    threads = {ident for _, ident in fake.calls}
    assert len(threads) == 1 and threading.get_ident() not in threads


# --- options --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("", None),
        ("http://proxy.lan:3128", {"proxy_hostname": "proxy.lan", "proxy_port": 3128}),
        ("http://proxy.lan", {"proxy_hostname": "proxy.lan", "proxy_port": 80}),
        ("http://u%40shop:p%3Ass@10.0.0.1:8080",
         {"proxy_hostname": "10.0.0.1", "proxy_port": 8080, "username": "u@shop", "password": "p:ss"}),
    ],
)
def test_proxy_url_to_sdk_settings(url: str, expected: dict[str, Any] | None) -> None:
    assert proxy_settings(url) == expected


@pytest.mark.parametrize("url", ["https://proxy.lan:3128", "http://:3128", "http://proxy.lan:99999", "socks5://p:1"])
def test_unusable_proxy_urls_are_config_errors(url: str) -> None:
    with pytest.raises(LinkConfigError):
        proxy_settings(url)


@pytest.mark.parametrize(
    ("no_proxy", "proxied"),
    [((), True), (("windows.net",), False), ((".servicebus.windows.net",), False), (("*",), False),
     (("other-ns.servicebus.windows.net", "example.com"), True)],
)
def test_options_from_config(no_proxy: tuple[str, ...], proxied: bool) -> None:
    sb = ServiceBusConfig(enabled=True, queue="store-1", sas_key_name="listen", sas_key="s3cr3t-key",
                          ca_file="/etc/ca.pem", max_wait_s=3.0)
    wan = WanConfig(proxy="http://proxy.lan:3128", no_proxy=no_proxy)
    options = LinkOptions.from_config(sb, wan)
    assert (options.namespace, options.queue, options.sas_key_name, options.sas_key) == (
        "e-serversync-ns.servicebus.windows.net", "store-1", "listen", "s3cr3t-key")
    assert (options.ca_file, options.max_wait_s, options.endpoint) == ("/etc/ca.pem", 3.0, "")
    assert options.proxy == ("http://proxy.lan:3128" if proxied else "")
    assert LinkOptions.from_config(sb, wan, queue="from-pairing").queue == "from-pairing"
    assert "s3cr3t" not in repr(options)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("queue", "", "queue"),
        ("sas_key", "", "key"),
        ("namespace", "sb://x.servicebus.windows.net", "host name"),
    ],
)
def test_incomplete_options_are_refused(field: str, value: str, match: str) -> None:
    options = LinkOptions(namespace="x.servicebus.windows.net", queue="q", sas_key_name="n", sas_key="k")
    with pytest.raises(LinkConfigError, match=match):
        open_queue_link(LinkOptions(**{**_fields(options), field: value}))


def _fields(options: LinkOptions) -> dict[str, Any]:
    import attrs

    return attrs.asdict(options)


# --- through a real HTTP proxy --------------------------------------------------------------


@dataclass(frozen=True)
class ConnectProxy:
    port: int
    log: Path
    user: str
    password: str

    @property
    def url(self) -> str:
        return f"http://{self.user}:{self.password}@127.0.0.1:{self.port}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[ConnectProxy]:
    """Debian's tinyproxy on a free loopback port, with basic auth, its own config and log."""
    binary = shutil.which("tinyproxy") or shutil.which("tinyproxy", path="/usr/bin:/usr/sbin")
    if binary is None:
        pytest.skip("tinyproxy is not installed (apt-get install tinyproxy)")
    log = tmp_path / "tinyproxy.log"
    user, password = "shop", uuid.uuid4().hex
    port = _free_port()  # tinyproxy cannot take a bound socket; the race is retried below
    for _attempt in range(3):
        conf = tmp_path / "tinyproxy.conf"
        conf.write_text(
            f'Port {port}\nListen 127.0.0.1\nTimeout 30\nLogFile "{log}"\nLogLevel Connect\n'
            f"MaxClients 20\nAllow 127.0.0.1\nConnectPort 443\nBasicAuth {user} {password}\n"
            f'PidFile "{tmp_path / "tinyproxy.pid"}"\n'
        )
        proc = subprocess.Popen([binary, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + PROXY_START_S
        while not _accepts(port) and time.monotonic() < deadline:
            try:
                proc.wait(0.02)  # polls the port, and notices an early exit (port taken)
                break
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None and _accepts(port):
            break
        proc.kill()
        proc.wait()
        port = _free_port()
    else:
        pytest.fail(f"tinyproxy did not start:\n{log.read_text(errors='replace') if log.exists() else ''}")
    try:
        yield ConnectProxy(port=port, log=log, user=user, password=password)
    finally:
        proc.terminate()
        proc.wait(PROXY_START_S)


@pytest.fixture
def amqp_server_on_443(tmp_path: Path) -> Iterator[AmqpServer]:
    """The test server where the namespace really is: 127.0.0.1:443 ("localhost")."""
    if os.geteuid() != 0:
        pytest.skip("the proxy test binds 127.0.0.1:443, which needs root (CI runs as root)")
    with socket.socket() as probe:
        # As the server's listener does: connections of an earlier run in TIME_WAIT on
        # port 443 do not make it "taken", a listener does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", 443))
        except OSError as exc:
            pytest.skip(f"127.0.0.1:443 is taken ({exc.strerror}); the proxy test needs it")
    with run_server(tmp_path / "tls-443", port=443, sas_key=uuid.uuid4().hex) as server:
        yield server


async def test_through_a_real_proxy_to_the_namespace_on_443(
    amqp_server_on_443: AmqpServer, tinyproxy: ConnectProxy, queue_name: str
) -> None:
    server = amqp_server_on_443
    assert (server.namespace, server.port) == ("localhost", 443)
    await _send(server, queue_name, data_message(b"{}", "via-proxy"))
    # As in production: no endpoint override, so the SDK connects to <namespace>:443.
    link = open_queue_link(_options(server, queue_name, endpoint="", proxy=tinyproxy.url))
    with trio.fail_after(TEST_DEADLINE_S):
        msg = await _receive_one(link)
        assert msg.message_id == "via-proxy"
        await link.complete(msg)
        await link.aclose()
    log = tinyproxy.log.read_text(errors="replace")
    assert "CONNECT localhost:443 HTTP/1.1" in log, log

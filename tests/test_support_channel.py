"""The remote support channel: a request on the support queue (the AMQP peer, real SDK on
both sides), the reply to the cloud simulator over HTTPS, and the time limit."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tarfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio
from azure.servicebus import ServiceBusMessage
from hypothesis import given
from hypothesis import strategies as st

from appliance.config import Config
from appliance.devkit.cloud import run_cloud_simulator
from appliance.devkit.cloud_state import QueueService, SimConfig
from appliance.protocol.support import SupportKind, SupportRequestError, parse_request
from appliance.services.assembly import service_specs
from appliance.services.bundle import PARTS
from appliance.services.pairing import pair_from_web
from appliance.services.runtime import Runtime
from appliance.services.state import QueuePhase
from appliance.services.support_channel import switch_support
from appliance.supervisor import open_runtime, supervise_all
from tests.amqp import fixtures
from tests.amqp.fixtures import AmqpServer

amqp_server = fixtures.amqp_server

DEADLINE_S = 40.0
DURATION_S = 6.0  # the channel's whole time in the test: it must answer, then switch off

ADMIN_TOKEN = "test-admin-token-0123456789"


async def until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` (the simulator's and the runtime's memory: nothing to wait on)."""
    with trio.fail_after(DEADLINE_S):
        while True:
            if predicate():
                return
            await trio.sleep(0.05)


def request(kind: str, **args: Any) -> tuple[str, ServiceBusMessage]:
    rid = f"req-{uuid.uuid4().hex[:8]}"
    body = json.dumps({"request_id": rid, "kind": kind, "args": args}).encode()
    return rid, ServiceBusMessage(body, message_id=rid)


async def test_answers_health_then_turns_itself_off(
    amqp_server: AmqpServer, make_config: Callable[..., Config], tmp_path: Any
) -> None:
    support = QueueService(namespace=amqp_server.namespace, queue="appliance-{appliance_id}-support",
                           sas_key_name=amqp_server.sas_key_name, sas_key=amqp_server.sas_key)
    async with trio.open_nursery() as nursery:
        sim = await nursery.start(run_cloud_simulator, SimConfig(products=3, tls_dir=str(tmp_path / "sim"),
                                                                 support=support, orders=None))
        config = make_config(
            cloud={"api_url": sim.url, "ca_file": str(sim.ca_path)},
            support={"enabled": True, "namespace": amqp_server.namespace, "testing": {"endpoint": amqp_server.endpoint},
                     "ca_file": amqp_server.ca_file, "max_wait_s": 1.0, "duration_s": DURATION_S})
        runtime = await open_runtime(config)
        try:
            async with trio.open_nursery() as box:
                await box.start(lambda task_status: supervise_all(runtime, service_specs(runtime),
                                                                  task_status=task_status))
                started = time.monotonic()
                assert runtime.support_window.describe().startswith("enabled until ")
                await pair_from_web(runtime, sim.pair_code)  # the pairing gives the support queue
                queue = f"appliance-{runtime.appliance_id}-support"
                rid, msg = request("health")
                bad = ServiceBusMessage(b'{"request_id": "x", "kind": "reboot"}', message_id="bad")
                lid, level = request("log_level", level="debug", duration_s=60)
                await trio.to_thread.run_sync(lambda: amqp_server.send(queue, msg, bad, level))
                await until(lambda: {rid, lid} <= set(sim.state.support))
                reply = sim.state.support[rid]["body"]
                assert reply["status"] == "ok" and reply["kind"] == "health"
                names = {c["name"] for c in reply["body"]["checks"]}
                assert "support.channel" in names and "cloud.pairing" in names
                assert logging.getLogger().level == logging.DEBUG
                # Its time ends: the channel closes its link and restores the log level.
                await until(lambda: runtime.support_link.phase is QueuePhase.OFF)
                assert time.monotonic() - started >= DURATION_S - 0.5
                assert runtime.support_window.describe() == "off"
                assert logging.getLogger().level != logging.DEBUG
                [check] = [c for c in await runtime.health.run_all() if c.name == "support.channel"]
                assert check.message == "remote support channel: off"
                [dead] = await trio.to_thread.run_sync(lambda: amqp_server.contents(queue, dead_letter=True))
                assert dead.properties["DeadLetterReason"] == "not a valid support request"
                assert "kind: must be one of health" in dead.properties["DeadLetterErrorDescription"]
                runtime.stopping.set()
        finally:
            runtime.db.close()
        nursery.cancel_scope.cancel()


async def test_a_bundle_request_uploads_the_bundle_through_the_sync_api(
    amqp_server: AmqpServer, make_config: Callable[..., Config], tmp_path: Any
) -> None:
    support = QueueService(namespace=amqp_server.namespace, queue="appliance-{appliance_id}-support",
                           sas_key_name=amqp_server.sas_key_name, sas_key=amqp_server.sas_key)
    async with trio.open_nursery() as nursery:
        sim = await nursery.start(run_cloud_simulator, SimConfig(products=3, tls_dir=str(tmp_path / "sim"),
                                                                 support=support, orders=None))
        config = make_config(
            cloud={"api_url": sim.url, "ca_file": str(sim.ca_path)},
            support={"enabled": True, "namespace": amqp_server.namespace, "testing": {"endpoint": amqp_server.endpoint},
                     "ca_file": amqp_server.ca_file, "max_wait_s": 1.0})
        runtime = await open_runtime(config)
        try:
            async with trio.open_nursery() as box:
                await box.start(lambda task_status: supervise_all(runtime, service_specs(runtime),
                                                                  task_status=task_status))
                await pair_from_web(runtime, sim.pair_code)
                assert runtime.store is not None
                logging.getLogger("appliance.test").warning("token in a record: %s", runtime.store.token)
                rid, msg = request("bundle", logs=200)
                queue = f"appliance-{runtime.appliance_id}-support"
                await trio.to_thread.run_sync(lambda: amqp_server.send(queue, msg))
                await until(lambda: rid in sim.state.support)
                reply = sim.state.support[rid]["body"]
                assert reply["kind"] == "bundle" and reply["body"]["uploaded"] is True
                stored = sim.state.bundles[rid]
                assert stored["sha256"] == reply["body"]["sha256"] and stored["size"] == reply["body"]["bytes"]
                with tarfile.open(fileobj=io.BytesIO(stored["data"])) as tar:
                    names = {n.removeprefix("appliance-bundle/") for n in tar.getnames()}
                    logs = tar.extractfile("appliance-bundle/logs.ndjson")
                    assert logs is not None
                    content = logs.read()
                assert names == {"manifest.json", *PARTS}
                assert b"token in a record" in content and runtime.store.token.encode() not in content
                runtime.stopping.set()
        finally:
            runtime.db.close()
        nursery.cancel_scope.cancel()


def test_requests_parse_strictly() -> None:
    req = parse_request(b'{"request_id": "r-1", "kind": "resync", "args": {"full": true}}')
    assert (req.kind, dict(req.args)) == (SupportKind.RESYNC, {"full": True})
    req = parse_request(b'{"request_id": "r-2", "kind": "bundle"}')
    assert (req.kind, dict(req.args)) == (SupportKind.BUNDLE, {"logs": 5000})
    for body, words in [
        (b"[]", "must be a JSON object"),
        (b'{"request_id": "r 1", "kind": "health"}', "request_id"),
        (b'{"request_id": "r", "kind": "log_level", "args": {"level": "loud"}}', "args.level"),
        (b'{"request_id": "r", "kind": "log_level", "args": {"level": "info", "duration_s": 86400}}', "duration_s"),
        (b'{"request_id": "r", "kind": "health", "args": {"x": 1}}', "unknown key"),
        (b'{"request_id": "r", "kind": "health", "extra": 1}', "unknown key"),
        (b'{"request_id": "r", "kind": "bundle", "args": {"logs": -1}}', "args.logs"),
        (b'{"request_id": "r", "kind": "bundle", "args": {"logs": true}}', "args.logs"),
    ]:
        with pytest.raises(SupportRequestError, match=words):
            parse_request(body)


@given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_any_bytes_parse_or_raise_the_protocol_error(body: bytes) -> None:
    with contextlib.suppress(SupportRequestError):
        parse_request(body)


async def test_the_homepage_switches_remote_support_on_and_off(appliance: Runtime) -> None:
    """A technician at the box allows remote support for a while, with the admin token."""
    home = f"http://127.0.0.1:{appliance.ports['admin']}"
    async with httpx.AsyncClient(base_url=home, timeout=10) as client:
        page = (await client.get("/")).text
        assert "Allow remote support for 4 h" in page and "action='/support-channel/action'" in page
        refused = await client.post("/support-channel/action", data={"token": "wrong", "action": "on"})
        assert refused.status_code == 401 and "not changed" in refused.text
        assert not appliance.support_window.is_open
        bad = await client.post("/support-channel/action", data={"token": ADMIN_TOKEN, "action": "maybe"})
        assert bad.status_code == 400 and not appliance.support_window.is_open
        on = await client.post("/support-channel/action", data={"token": ADMIN_TOKEN, "action": "on"})
        assert on.status_code == 303 and appliance.support_window.is_open
        page = (await client.get("/")).text
        assert "enabled until" in page and "Switch off" in page
        off = await client.post("/support-channel/action", data={"token": ADMIN_TOKEN, "action": "off"})
        assert off.status_code == 303 and not appliance.support_window.is_open


async def test_the_window_survives_a_restart_and_a_restart_never_extends_it(
    make_config: Callable[..., Config],
) -> None:
    from tests.conftest import running_box

    # Opened from the homepage: a restart keeps the same end.
    async with running_box(make_config()) as box:
        opened = await switch_support(box, True)
        until = opened.until_wall
    assert until is not None
    async with running_box(make_config()) as box:
        window = box.support_window
        assert window.is_open and window.until_wall == until
        await switch_support(box, False)
    async with running_box(make_config()) as box:
        assert not box.support_window.is_open  # switched off stays off
    # [support] enabled = true opens one window, not a fresh one at every start.
    # (namespace: loopback, so nothing here could ever probe a real host)
    enabled = make_config(support={"enabled": True, "duration_s": 3600.0, "namespace": "localhost"})
    async with running_box(enabled) as box:
        first = box.support_window.until_wall
    assert first is not None
    async with running_box(enabled) as box:
        assert box.support_window.until_wall == first

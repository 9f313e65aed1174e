"""SIGKILL of the real appliance process between the order's commit and the message's
completion: the message comes back, and there is still one order and one device command.

The window is a few milliseconds in production; the test-only ``[orders]
testing.pause_after_commit_s`` (off by default) holds the receiver inside it, so the kill
lands there every time. The test checks it did: the order is on disk AND the message is
still on the queue when the process dies.
"""

from __future__ import annotations

import signal
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from appliance.devkit.device import DeviceSimulator, read_log, run_device_simulator
from tests.amqp import fixtures
from tests.amqp.fixtures import AmqpServer
from tests.conftest import device_key
from tests.test_orders_e2e import order, sender_for

amqp_server = fixtures.amqp_server
queue_name = fixtures.queue_name

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 60.0
T = TypeVar("T")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def write_config(path: Path, state: Path, server: AmqpServer, queue: str, device_port: int, pause_s: float) -> None:
    sections: dict[str, dict[str, Any]] = {
        "lan": {"bind": "127.0.0.1"},
        "lan.ports": dict.fromkeys(["admin", "api", "events", "media", "provisioning", "ops", "support",
                                    "discovery"], 0),
        "storage": {"dir": str(state)},
        "admin": {"token": "test-admin-token-0123456789"},
        "cloud": {"api_url": "https://127.0.0.1:9"},
        "discovery": {"enabled": False},
        "orders": {"enabled": True, "namespace": server.namespace, "queue": queue,
                   "sas_key_name": server.sas_key_name, "sas_key": server.sas_key,
                   "ca_file": server.ca_file, "max_wait_s": 1.0},
        "orders.testing": {"endpoint": server.endpoint, "pause_after_commit_s": pause_s},
    }
    text = "".join(f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items()) + "\n"
                   for name, values in sections.items())
    text += ("[[devices]]\nid = \"kds-1\"\nkind = \"kds\"\naddress = \"127.0.0.1\"\n"
             f'port = {device_port}\nkey = "{device_key("kds-1").hex()}"\n')
    path.write_text(text)


def counts(db: Path) -> tuple[int, int]:
    if not db.exists():
        return (0, 0)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        orders = conn.execute("SELECT count(*) FROM online_orders").fetchone()[0]
        commands = conn.execute("SELECT count(*) FROM online_order_commands").fetchone()[0]
        return (orders, commands)
    except sqlite3.OperationalError:  # not migrated yet
        return (0, 0)
    finally:
        conn.close()


async def poll(fetch: Callable[[], Awaitable[T]], done: Callable[[T], bool]) -> T:
    with trio.fail_after(DEADLINE_S):
        while True:
            value = await fetch()
            if done(value):
                return value
            await trio.sleep(0.05)


@pytest.mark.slow
async def test_sigkill_between_commit_and_complete(amqp_server: AmqpServer, queue_name: str, tmp_path: Path) -> None:
    state, cfg, log_path = tmp_path / "state", tmp_path / "appliance.toml", tmp_path / "kds.jsonl"
    db = state / "appliance.db"
    sim = DeviceSimulator(device_id="kds-1", kind="kds", log_path=log_path, fsync=True, key=device_key("kds-1"))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(run_device_simulator, sim, port=0, bind="127.0.0.1"))
        sender = sender_for(amqp_server, queue_name)
        try:
            await sender(order(42))
        finally:
            await sender.aclose()

        write_config(cfg, state, amqp_server, queue_name, port, pause_s=300.0)
        first_err = tmp_path / "first.stderr"
        with first_err.open("wb") as err:
            proc = await trio.lowlevel.open_process([sys.executable, "-m", "appliance", "run", "--config", str(cfg)],
                                                    cwd=ROOT, stderr=err)
        try:
            await poll(lambda: trio.to_thread.run_sync(counts, db), lambda c: c == (1, 1))
            # Inside the window: durable on the box, not completed on the queue.
            left = await trio.to_thread.run_sync(lambda: amqp_server.contents(queue_name))
            assert [m.id for m in left] == ["web-000042"]
            proc.send_signal(signal.SIGKILL)
        finally:
            with trio.move_on_after(10, shield=True):
                await proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert "test pause of 300 s after the commit of web-000042" in first_err.read_text()

        write_config(cfg, state, amqp_server, queue_name, port, pause_s=0.0)
        second_err = tmp_path / "second.stderr"
        with second_err.open("wb") as err:
            proc = await trio.lowlevel.open_process([sys.executable, "-m", "appliance", "run", "--config", str(cfg)],
                                                    cwd=ROOT, stderr=err)
        try:
            # The message came back and was completed; the device took the command once.
            await poll(lambda: trio.to_thread.run_sync(lambda: amqp_server.contents(queue_name)), lambda m: m == [])
            await poll(lambda: trio.to_thread.run_sync(read_log, log_path), lambda got: len(got) >= 1)
        finally:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(20, shield=True):
                await proc.wait()
        assert proc.returncode == 0, second_err.read_text()[-3000:]
        assert "web-000042 was taken before (delivery 1)" in second_err.read_text()
        assert counts(db) == (1, 1)
        taken = read_log(log_path)
        assert [(c.kind, c.body["order"]["order_id"]) for c in taken] == [("order.created", "web-000042")]
        assert sim.duplicates <= 1  # a resend after the kill is deduplicated by the device, by id
        nursery.cancel_scope.cancel()
    sim.close()

"""The event log across a SIGKILL of the real `appliance run` process: every committed
change has its event and no event lacks its change, no id is given twice, and a client
resuming from the last id it saw gets everything committed after it."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import trio
from trio_websocket import ConnectionClosed

from tests.event_clients import AUTH, TOKEN, box_toml, events, next_message, post_sales, sale, start_box


async def test_no_id_reused_and_no_change_missing_across_sigkill(tmp_path: Path) -> None:
    cfg = box_toml(tmp_path)
    box = start_box(cfg, tmp_path / "box.log")
    seen: list[dict] = []
    try:
        await post_sales(box.url("api"), ["before-0"])
        async with box.stream(f"topics=orders&after=0&token={TOKEN}") as ws:
            await next_message(ws)
            seen += await events(ws, 1)
            posted: list[str] = []
            enough = trio.Event()

            def post_until_gone(n: int) -> None:
                # In a thread: posts end by themselves when the box dies (no cancelled request).
                with httpx.Client(base_url=box.url("api"), headers=AUTH, timeout=5) as client:
                    for i in range(10_000):
                        sale_id = f"p{n}-{i:05d}"
                        try:
                            client.post("/v1/sales", json=sale(sale_id))
                        except httpx.TransportError:
                            return
                        posted.append(sale_id)
                        if len(posted) == 150:
                            trio.from_thread.run_sync(enough.set)

            async def poster(n: int) -> None:
                await trio.to_thread.run_sync(post_until_gone, n)

            gone = trio.Event()

            async def reader() -> None:
                try:
                    while True:
                        seen.append(json.loads(await ws.get_message()))
                except ConnectionClosed:
                    gone.set()  # the box died under it

            async with trio.open_nursery() as nursery:
                for n in range(4):
                    nursery.start_soon(poster, n)
                nursery.start_soon(reader)
                with trio.fail_after(30):
                    await enough.wait()
                box.kill()  # SIGKILL: in the middle of writes and sends
                with trio.fail_after(10):
                    await gone.wait()
    finally:
        if box.proc.poll() is None:
            box.kill()
    seen = [m for m in seen if "id" in m]
    db_path = tmp_path / "state" / "appliance.db"

    def log_and_tables() -> tuple[dict[int, str], set[str], int]:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
            log = {row[0]: row[1] for row in conn.execute(
                "SELECT id, subject FROM event_log WHERE type = 'sale.received'")}
            sales = {row[0] for row in conn.execute("SELECT id FROM device_sales")}
            head = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'event_log'").fetchone()[0]
        return log, sales, head

    box = start_box(cfg, tmp_path / "box-again.log")  # the same state directory
    try:
        log, sales, head = log_and_tables()
        # Every committed sale has exactly one event, and every event its sale.
        assert sorted(log.values()) == sorted(sales)
        assert len(sales) >= 150
        # What a client was sent before the kill is in the log under the same ids.
        assert seen and all(log[m["id"]] == m["data"]["id"] for m in seen)
        # Resuming from the last id it saw: exactly the committed rest, then new ones.
        last = seen[-1]["id"]
        rest = sorted(i for i in log if i > last)
        async with box.stream(f"topics=orders&after={last}&token={TOKEN}") as ws:
            assert (await next_message(ws))["type"] == "subscribed"
            got = await events(ws, len(rest))
            assert [m["id"] for m in got] == rest
            await post_sales(box.url("api"), ["after-restart"])
            [new] = await events(ws, 1)
            assert new["data"]["id"] == "after-restart" and new["id"] > head  # no id given twice
    finally:
        box.proc.terminate()
        box.proc.wait(timeout=15)


def test_appliance_events_tails_the_stream_for_a_technician(tmp_path: Path) -> None:
    cfg = box_toml(tmp_path)
    box = start_box(cfg, tmp_path / "box.log")
    try:
        trio.run(post_sales, box.url("api"), ["t-1", "t-2"])
        base = [sys.executable, "-m", "appliance", "events", "--config", str(cfg), "--host", "127.0.0.1",
                "--port", str(box.ports["events"]), "--topics", "orders", "--after", "0", "--count", "2"]
        as_json = subprocess.run([*base, "--json"], capture_output=True, text=True, timeout=60, check=False)
        assert as_json.returncode == 0, as_json.stderr
        lines = [json.loads(line) for line in as_json.stdout.splitlines()]
        assert lines[0]["type"] == "subscribed"
        assert [m["data"]["id"] for m in lines[1:]] == ["t-1", "t-2"]
        text = subprocess.run(base, capture_output=True, text=True, timeout=60, check=False)
        assert text.returncode == 0, text.stderr
        rows = text.stdout.splitlines()
        assert rows[0].startswith("-- subscribed")
        assert "sale.received" in rows[1] and "id=t-1" in rows[1] and "source=device" in rows[1]
    finally:
        box.proc.terminate()
        box.proc.wait(timeout=15)
    refused = subprocess.run([sys.executable, "-m", "appliance", "events", "--config", str(cfg), "--port",
                              str(box.ports["events"])], capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 2 and "cannot reach the event stream" in refused.stderr

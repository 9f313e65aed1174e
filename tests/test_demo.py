"""The README's run command in its demo form: a simulated cloud and devices, the box paired,
a catalog arriving and kiosk orders reaching the kitchen screen and the printer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.test_process import free_port_block


def run_demo_until(tmp_path: Path, *extra: str, until: Callable[[str], bool]) -> tuple[int, str]:
    """Run `appliance demo` until its output satisfies ``until``; then SIGINT it.
    Returns the port offset used and the output."""
    offset = free_port_block()
    out = tmp_path / "demo.out"
    with out.open("w") as stdout:
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "demo", "--state-dir", str(tmp_path / "demo"),
                                 "--port-offset", str(offset), "--order-every", "0.5", "--products", "50", *extra],
                                stdout=stdout, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while True:  # a subprocess's output: nothing to wait on but the file
            text = out.read_text()
            if until(text):
                break
            assert proc.poll() is None, text
            assert time.monotonic() < deadline, f"no order reached the devices within 60 s:\n{text}"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return offset, text


def test_demo_shows_orders_flowing_and_stops_cleanly(tmp_path: Path) -> None:
    offset, text = run_demo_until(tmp_path, until=lambda t: "kitchen-1: took" in t and "printer-1: took" in t)
    assert f"homepage     http://127.0.0.1:{offset + 80}/" in text
    assert "paired with store store-0001" in text
    log = tmp_path / "demo" / "devices" / "kitchen-1.jsonl"
    kitchen = [json.loads(line) for line in log.read_text().splitlines()]
    assert kitchen and kitchen[0]["kind"] == "order.created"
    assert kitchen[0]["body"]["order"]["lines"]  # a real order from the synced catalog


def test_demo_online_orders_come_through_service_bus(tmp_path: Path) -> None:
    pytest.importorskip("proton", reason="the test AMQP peer needs python-qpid-proton (scripts/setup --test)")
    run_demo_until(tmp_path, "--online-orders", until=lambda t: any(
        line.startswith("kitchen-1: took") and "web-000001" in line for line in t.splitlines()))
    log = tmp_path / "demo" / "devices" / "kitchen-1.jsonl"
    taken = [json.loads(line) for line in log.read_text().splitlines()]
    online = [c for c in taken if c["body"].get("source") == "online"]
    assert online and online[0]["body"]["order"]["order_id"] == "web-000001"

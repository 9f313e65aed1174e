"""The README's run command in its demo form: a simulated cloud and devices, the box paired,
a catalog arriving and kiosk orders reaching the kitchen screen and the printer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.test_process import free_port_block


def test_demo_shows_orders_flowing_and_stops_cleanly(tmp_path: Path) -> None:
    offset = free_port_block()
    out = tmp_path / "demo.out"
    with out.open("w") as stdout:
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "demo", "--state-dir", str(tmp_path / "demo"),
                                 "--port-offset", str(offset), "--order-every", "0.5", "--products", "50"],
                                stdout=stdout, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while True:
            text = out.read_text()
            if "kitchen-1: took" in text and "printer-1: took" in text:
                break
            assert proc.poll() is None, text
            assert time.monotonic() < deadline, f"no order reached the devices within 60 s:\n{text}"
            time.sleep(0.2)
        assert f"homepage     http://127.0.0.1:{offset + 80}/" in text
        assert "paired with store store-0001" in text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = tmp_path / "demo" / "devices" / "kitchen-1.jsonl"
    kitchen = [json.loads(line) for line in log.read_text().splitlines()]
    assert kitchen and kitchen[0]["kind"] == "order.created"
    assert kitchen[0]["body"]["order"]["lines"]  # a real order from the synced catalog

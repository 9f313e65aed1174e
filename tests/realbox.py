"""The real ``appliance run`` process for tests: its configuration as shipped (no admin token
pinned) and a context manager that starts it, waits for its admin listener and stops it
with SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

__all__ = ["box_config", "real_box"]


def box_config(tmp_path: Path, sim_url: str, ca: Path | None, admin_port: int, ops_port: int = 0) -> Path:
    """A box as shipped: no admin token in the configuration (the image has none).
    ``ca``: the simulator's CA, or None when only the setup file's proxy CA trusts it."""
    path = tmp_path / "appliance.toml"
    ports = "\n".join(f"{role} = 0" for role in ("api", "events", "media", "provisioning", "support", "discovery"))
    ca_line = f'ca_file = "{ca}"\n' if ca else ""
    path.write_text(f'[lan]\nbind = "127.0.0.1"\n[lan.ports]\nadmin = {admin_port}\nops = {ops_port}\n{ports}\n'
                    f'[storage]\ndir = "{tmp_path / "state"}"\n[supervisor]\nshutdown_deadline_s = 5.0\n'
                    f'[discovery]\nenabled = false\n[orders]\nenabled = false\n'
                    f'[cloud]\napi_url = "{sim_url}"\n{ca_line}connect_timeout_s = 2.0\nread_timeout_s = 5.0\n'
                    "backoff_initial_s = 0.1\nbackoff_max_s = 0.5\npull_interval_s = 0.5\n")
    return path


@asynccontextmanager
async def real_box(config: Path, admin_port: int, log: Path) -> AsyncIterator[httpx.AsyncClient]:
    """``appliance run`` in its own process; a client of its admin listener once the process
    said READY=1 (every service started) on its own $NOTIFY_SOCKET. Stopped with SIGTERM
    (exit 0 expected) when the block ends."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC")}
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        path = log.with_name(f"{log.name}.notify")
        path.unlink(missing_ok=True)
        await notify.bind(str(path))
        env["NOTIFY_SOCKET"] = str(path)
        with log.open("ab") as stderr:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "appliance", "run", "--config", str(config)], stderr=stderr, env=env)
        try:
            with trio.move_on_after(30) as waiting:
                while b"READY=1" not in await notify.recv(4096):
                    pass
            assert not waiting.cancelled_caught, f"no READY=1 within 30 s: {await trio.Path(log).read_text()}"
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{admin_port}", timeout=10) as client:
                yield client
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                assert await proc.wait() == 0, await trio.Path(log).read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                await proc.wait()

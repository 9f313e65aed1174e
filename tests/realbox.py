"""The real ``appliance run`` process for tests: its configuration as shipped (no admin token
pinned) and a context manager that starts it, waits for its admin listener and stops it
with SIGTERM; and :class:`BoxProcess`, the box the crash tests kill with SIGKILL and start
again on the same ports and state."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

from appliance.config import LISTENER_ROLES
from appliance.devkit.cloud import SimHandle
from tests.sync_helpers import ADMIN, free_port, wait_until

__all__ = ["BoxProcess", "box_config", "loopback_config", "real_box"]


def loopback_config(tmp_path: Path, *, token: str, ports: Mapping[str, int] | None = None, tables: str = "") -> Path:
    """``tmp_path/appliance.toml`` for ``appliance run`` on loopback: every listener on the
    port given in ``ports`` or one the kernel picks, state in ``tmp_path/state``, the admin
    ``token``, a 5 s stop, no discovery beacons, no online orders; then ``tables`` (the
    test's own TOML: [cloud], [logs]...)."""
    listed = "\n".join(f"{role} = {(ports or {}).get(role, 0)}" for role in (*LISTENER_ROLES, "discovery"))
    path = tmp_path / "appliance.toml"
    path.write_text(f'[lan]\nbind = "127.0.0.1"\n[lan.ports]\n{listed}\n[storage]\ndir = "{tmp_path / "state"}"\n'
                    f'[admin]\ntoken = "{token}"\n[supervisor]\nshutdown_deadline_s = 5.0\n'
                    f'[discovery]\nenabled = false\n[orders]\nenabled = false\n{tables}')
    return path


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


class BoxProcess:
    """``python -m appliance run --config F`` as its own process, paired with the simulator
    ``sim`` over TLS: the listeners of ``roles`` on fixed loopback ports (kept across
    restarts; the others on 0), its log in a file. :meth:`start` waits until ``roles[-1]``
    answers ``/healthz``. ``cloud``: more ``[cloud]`` settings; ``settings``: more TOML
    tables (a start may give others, the configuration is written again each time)."""

    def __init__(self, tmp_path: Path, sim: SimHandle, *, roles: tuple[str, ...] = ("admin", "api"),
                 cloud: Mapping[str, Any] | None = None, settings: str = "") -> None:
        self.sim, self.settings = sim, settings
        self.state = tmp_path / "state"
        self.log = tmp_path / "appliance.log"
        self.config = tmp_path / "appliance.toml"
        self.ports = {role: free_port() for role in roles}
        self._probe = roles[-1]
        self._cloud = {"pull_interval_s": 0.1, "backoff_initial_s": 0.05, "backoff_max_s": 0.3, **(cloud or {})}
        self.process: trio.Process | None = None

    @property
    def db(self) -> Path:
        return self.state / "appliance.db"

    def url(self, role: str) -> str:
        return f"http://127.0.0.1:{self.ports[role]}"

    def write_config(self, settings: str) -> None:
        cloud = "".join(f"{k} = {json.dumps(v)}\n" for k, v in self._cloud.items())
        tables = f'[cloud]\napi_url = "{self.sim.url}"\nca_file = "{self.sim.ca_path}"\n{cloud}{settings}'
        loopback_config(self.config.parent, token=ADMIN, ports=self.ports, tables=tables)

    async def start(self, *, settings: str | None = None) -> None:
        self.write_config(self.settings if settings is None else settings)
        with self.log.open("ab") as log:
            self.process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "appliance", "run", "--config", str(self.config)],
                stdout=subprocess.DEVNULL, stderr=log)

        async def healthy() -> bool:
            assert self.process is not None
            if self.process.returncode is not None:
                raise AssertionError(f"the box exited with {self.process.returncode}: {self.log.read_text()}")
            try:
                async with httpx.AsyncClient(trust_env=False) as client:
                    return (await client.get(f"{self.url(self._probe)}/healthz")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_until(healthy, 30.0, "the box answering")

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()
        assert self.process.returncode == -signal.SIGKILL

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            with trio.move_on_after(10):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()

    def client(self, role: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url(role), headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10.0,
                                 trust_env=False)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """A read of the box's database from outside (what is on disk right now)."""
        if not self.db.exists():
            return []
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute(sql).fetchall()
        except sqlite3.OperationalError:  # the schema is not there yet
            return []
        finally:
            conn.close()


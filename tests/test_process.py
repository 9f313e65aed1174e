"""The real `appliance run` process: READY=1 over $NOTIFY_SOCKET, all seven listeners,
the homepage, SIGTERM -> STOPPING=1 and exit 0 within the deadline; a port in use -> one
clear line and exit 2."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from appliance.config import LISTENER_ROLES


def free_port_block() -> int:
    """A base port B such that B+0..B+8005 look free (the offset moves 80 and 8000-8005)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        offset = base - 80
        if offset + 8005 > 65000:
            continue
        wanted = [offset + 80, *(offset + p for p in range(8000, 8006))]
        try:
            for port in wanted:
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return offset
    pytest.skip("no free block of ports found on loopback")


def write_config(tmp_path: Path, extra: str = "") -> Path:
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(
        f"""
[lan]
bind = "127.0.0.1"
[storage]
dir = "{tmp_path / 'state'}"
[supervisor]
shutdown_deadline_s = 5.0
[discovery]
enabled = false
[orders]
enabled = false
{extra}
"""
    )
    return cfg


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.path = path
        self.messages: list[str] = []

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in m for m in self.messages):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {text!r} within {timeout} s; got {self.messages}")
            self.sock.settimeout(remaining)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def close(self) -> None:
        self.sock.close()


def test_run_notify_serve_and_stop_on_sigterm(tmp_path: Path) -> None:
    offset = free_port_block()
    cfg = write_config(tmp_path)
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000",
           "WATCHDOG_PID": ""}
    env.pop("JOURNAL_STREAM", None)
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(cfg),
                                 "--port-offset", str(offset)], env=env, stderr=stderr)
    try:
        notify.wait_for("READY=1", timeout=30)
        ports = {role: offset + port for role, port in
                 {"admin": 80, "api": 8000, "events": 8001, "media": 8002, "provisioning": 8003,
                  "ops": 8004, "support": 8005}.items()}
        with httpx.Client(timeout=5) as client:
            for role in LISTENER_ROLES:
                answer = client.get(f"http://127.0.0.1:{ports[role]}/healthz")
                assert answer.status_code == 200, role
                assert answer.json()["service"] == role
            home = client.get(f"http://127.0.0.1:{ports['admin']}/")
            assert home.headers["content-type"].startswith("text/html")
            assert "<h1>Store appliance</h1>" in home.text and "http.api" in home.text
            assert client.get(f"http://127.0.0.1:{ports['ops']}/readyz").json()["ready"] is True
            assert client.get(f"http://127.0.0.1:{ports['media']}/no/such/thing").status_code == 404
        # The watchdog pings at half of WATCHDOG_USEC while healthy.
        notify.wait_for("WATCHDOG=1", timeout=5)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
        elapsed = time.monotonic() - started
        notify.wait_for("STOPPING=1", timeout=1)
        assert code == 0, log.read_text()
        assert elapsed < 5.0  # within the configured deadline
        # The state directory now holds the database and a 0600 admin token.
        token = tmp_path / "state" / "admin.token"
        assert token.stat().st_mode & 0o777 == 0o600
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


def test_port_in_use_stops_startup_with_one_line(tmp_path: Path) -> None:
    offset = free_port_block()
    holder = socket.socket()
    holder.bind(("127.0.0.1", offset + 8002))
    holder.listen()
    try:
        result = subprocess.run([sys.executable, "-m", "appliance", "run", "--config", str(write_config(tmp_path)),
                                 "--port-offset", str(offset)], capture_output=True, text=True, timeout=60,
                                check=False)
    finally:
        holder.close()
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert f"127.0.0.1:{offset + 8002}" in errors[0] and "media" in errors[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can drop to another user")
def test_runs_as_a_normal_user_with_port_offset(tmp_path: Path) -> None:
    """The README's promise: a user without privileges runs the box with --port-offset."""
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user on this machine")
    offset = free_port_block()
    tmp_path.chmod(0o777)
    cfg = write_config(tmp_path)
    cfg.chmod(0o644)
    log = tmp_path / "stderr.log"
    try:
        with log.open("w") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(cfg),
                                     "--port-offset", str(offset)], user=nobody.pw_uid, group=nobody.pw_gid,
                                    stderr=stderr, env={**os.environ, "HOME": str(tmp_path)})
    except PermissionError:
        pytest.skip(f"this Python ({sys.executable}) is not executable by other users on this machine")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = httpx.get(f"http://127.0.0.1:{offset + 8004}/readyz", timeout=1)
                if answer.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "not ready within 30 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

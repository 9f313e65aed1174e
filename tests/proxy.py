"""A real HTTP CONNECT proxy for tests: Debian's tinyproxy on loopback, with its own config
file and log in the test's directory.

Use it as a pytest plugin (``pytest_plugins = ["tests.proxy"]``) for the ``tinyproxy``
fixture, or call :func:`run_tinyproxy` from a fixture of your own::

    proxy = await nursery.start(run_tinyproxy, tmp_path / "proxy")
    proxy.url            # "http://127.0.0.1:PORT" for [wan] proxy
    proxy.connects()     # the "CONNECT host:port" requests it has seen, from its log

Skips when tinyproxy is not installed (``scripts/setup --test`` installs it as root).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Final

import attrs
import pytest
import trio

__all__ = ["Tinyproxy", "free_port", "run_tinyproxy", "tinyproxy"]

# How long tinyproxy may take to listen after it is started.
START_TIMEOUT_S: Final = 10.0
_CONNECT: Final = re.compile(r"Request \(file descriptor \d+\): CONNECT (\S+) HTTP/1\.[01]")


def free_port() -> int:
    """A loopback port free right now (tinyproxy cannot take port 0 and report it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@attrs.frozen(kw_only=True)
class Tinyproxy:
    port: int
    log_path: Path
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def connects(self) -> list[str]:
        """Every ``host:port`` tinyproxy was asked to CONNECT to, in order."""
        return _CONNECT.findall(self.log())


def _config(directory: Path, port: int, basic_auth: tuple[str, str] | None = None) -> str:
    auth = [f"BasicAuth {basic_auth[0]} {basic_auth[1]}"] if basic_auth else []
    return "\n".join([*auth,
        f"Port {port}",
        "Listen 127.0.0.1",
        "Timeout 30",
        f'LogFile "{directory / "tinyproxy.log"}"',
        "LogLevel Connect",
        f'PidFile "{directory / "tinyproxy.pid"}"',
        "MaxClients 50",
        "Allow 127.0.0.1",
        # No ConnectPort line: CONNECT to any port (the simulator is not on 443 in tests).
        "",
    ])


def _prepare(directory: Path, basic_auth: tuple[str, str] | None = None) -> tuple[str, int, Path]:
    binary = shutil.which("tinyproxy", path="/usr/local/bin:/usr/bin:/usr/sbin:/bin")
    if binary is None:
        pytest.skip("tinyproxy is not installed (apt-get install tinyproxy; scripts/setup --test does it)")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = directory / "tinyproxy.conf"
    config.write_text(_config(directory, port, basic_auth))
    return binary, port, config


async def _wait_listening(port: int, process: trio.Process) -> None:
    with trio.fail_after(START_TIMEOUT_S):
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"tinyproxy exited with {process.returncode} before listening")
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.02)  # an external process: nothing to wait on but its port
                continue
            await stream.aclose()
            return


async def run_tinyproxy(directory: Path, *, basic_auth: tuple[str, str] | None = None,
                        task_status: trio.TaskStatus[Tinyproxy] = trio.TASK_STATUS_IGNORED) -> None:
    """Run tinyproxy in the foreground until cancelled; started() once it accepts.
    ``basic_auth``: (user, password) every request must carry (Proxy-Authorization)."""
    binary, port, config = _prepare(directory, basic_auth)
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(_runner(binary, config))
        try:
            await _wait_listening(port, process)
            task_status.started(Tinyproxy(port=port, log_path=directory / "tinyproxy.log", config_path=config))
            await process.wait()
            raise RuntimeError(f"tinyproxy exited with {process.returncode}; see {directory / 'tinyproxy.log'}")
        finally:
            with trio.move_on_after(2, shield=True):
                process.terminate()
                await process.wait()


def _runner(binary: str, config: Path) -> Callable[..., Awaitable[None]]:
    async def run(*, task_status: trio.TaskStatus[trio.Process]) -> None:
        await trio.run_process([binary, "-d", "-c", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, check=False, task_status=task_status)

    return run


@pytest.fixture
async def tinyproxy(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Tinyproxy]:
    """A tinyproxy on loopback for this test, stopped at its end."""
    proxy: Tinyproxy = await nursery.start(run_tinyproxy, tmp_path / "tinyproxy")
    yield proxy

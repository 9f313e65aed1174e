"""A planted proxy password never shows: not on any page or API answer, not in the log, not
in ``config show``.

The real process runs with ``[wan] proxy = "http://planted-user:<password>@127.0.0.1:9"``
(a closed port: every WAN call fails through the proxy, and says so in the log and on the
pages). Every GET route of every listener without path parameters is fetched, with the
admin token, and the answer searched for the password; so is the whole log, and the output
of ``appliance config show``.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio
from starlette.routing import Route

from appliance.logs import setup_logging
from appliance.services.assembly import listener_apps
from appliance.supervisor import open_runtime
from benchmarks.soak import start_box
from tests.conftest import ConfigFactory

TOKEN = "test-admin-token-0123456789"
PASSWORD = "PLANTED-pw-7f3a9c"
PROXY = f"http://planted-user:{PASSWORD}@127.0.0.1:9"


def get_routes(make_config: ConfigFactory) -> dict[str, list[str]]:
    """Every GET path without parameters, by listener role (read from the apps themselves)."""

    async def read() -> dict[str, list[str]]:
        runtime = await open_runtime(make_config())
        try:
            return {role: sorted(r.path for r in app.routes
                                 if isinstance(r, Route) and "GET" in (r.methods or ()) and "{" not in r.path)
                    for role, app in listener_apps(runtime).items()}
        finally:
            runtime.db.close()

    return trio.run(read)


def first_bytes(client: httpx.Client, url: str, *, limit: int = 1 << 20, wait_s: float = 2.0) -> str:
    """The answer's text, or as much of it as arrives within ``wait_s`` (a stream, such as
    the event stream or the log tail, never ends by itself)."""
    got = b""
    deadline = time.monotonic() + wait_s
    try:
        with client.stream("GET", url, timeout=wait_s) as answer:
            for chunk in answer.iter_raw():
                got += chunk
                if len(got) >= limit or time.monotonic() > deadline:
                    break
    except httpx.ReadTimeout:
        pass  # a quiet stream: what came is what there is
    return got.decode("utf-8", "replace")


def test_a_planted_proxy_password_is_never_shown(make_config: ConfigFactory, tmp_path: Path) -> None:
    routes = get_routes(make_config)
    assert "/api/status" in routes["admin"] and "/health" in routes["ops"]
    (tmp_path / "box").mkdir()
    proc, ports, log = start_box(tmp_path / "box", [], token=TOKEN, extra=f'[wan]\nproxy = "{PROXY}"\n')
    try:
        time.sleep(3)  # the sync and pairing tasks try the WAN through the proxy, and fail
        seen = 0
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            for role, paths in routes.items():
                for path in paths:
                    text = first_bytes(client, f"http://127.0.0.1:{ports[role]}{path}")
                    assert PASSWORD not in text and "planted-user" not in text, (role, path)
                    seen += 1
            forced = client.post(f"http://127.0.0.1:{ports['ops']}/health")  # every check, now
            assert forced.status_code == 200 and PASSWORD not in forced.text
            # Pairing goes out through the proxy and fails: the answer names the hop, not the password.
            pairing = client.post(f"http://127.0.0.1:{ports['admin']}/api/pairing", json={"code": "ABCD-2345"})
            assert pairing.status_code in (400, 502) and PASSWORD not in pairing.text, pairing.text
            status = client.get(f"http://127.0.0.1:{ports['admin']}/api/status").text
        assert seen >= 15
        assert "127.0.0.1:9" in status or "proxy" in status  # the proxy is shown: by its address
    finally:
        proc.terminate()
        proc.wait(10)
    text = log.read_text()
    assert "ready:" in text and PASSWORD not in text and "planted-user" not in text
    shown = subprocess.run([sys.executable, "-m", "appliance", "config", "show", "--config",
                            str(tmp_path / "box" / "appliance.toml")], check=False, capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert PASSWORD not in shown.stdout + shown.stderr and "***@127.0.0.1:9" in shown.stdout


def test_every_log_line_is_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    for fmt in ("text", "json"):
        setup_logging("info", fmt, env={})
        logging.getLogger("appliance.test").warning("cannot reach %s: refused", PROXY)
        try:
            raise OSError(f"through {PROXY}")
        except OSError:
            logging.getLogger("appliance.test").exception("failed")
        err = capsys.readouterr().err
        assert PASSWORD not in err and "http://***@127.0.0.1:9" in err, err
    setup_logging("info", "text", env={})
